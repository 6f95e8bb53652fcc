"""The container tier with crun and with gVisor (runsc), cold containers (no pool).

- startup: the tier's startup metric for ``/bin/true`` (bundle, create, start);
- cleanup: the tier's teardown (metrics read, kill/reap, runtime delete, cgroup removal) plus
  workspace removal;
- exec: the native ``cpu_kernel`` binary run inside the container (host binary bound
  read-only) against the same binary fork+exec'd directly; container CPU from its cgroup
  (cpuacct), native CPU from rusage, interleaved pairs;
- memory: the container cgroup's peak charge minus the task's own peak RSS (``cpu_work``
  prints its VmHWM); with gVisor the cgroup also holds the Sentry and Gofer;
- throughput: ``/bin/true`` tasks through ``Sandbox.run`` on every core.

Run standalone: ``python3 benchmarks/bench_container.py [--quick]`` (needs root and crun).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    CORES,
    NATIVE,
    NoProgress,
    Progress,
    Row,
    check,
    interleave,
    missing,
    spawn,
    throughput,
    vm_hwm_bytes,
)
from benchmarks.report import print_rows  # noqa: E402
from guests.build import build_native as build_kernel  # noqa: E402
from guests.native.build import build_native  # noqa: E402
from wasmbox import Policy, Sandbox, Task  # noqa: E402
from wasmbox.models import FilesystemPolicy, TierName  # noqa: E402
from wasmbox.tiers.container import ContainerTier  # noqa: E402

STEPS = 8
KERNELS = "/opt/kernels"
PROGRAMS = "/opt/programs"
RUNTIMES = (("container-crun", "container (crun)", None),
            ("container-gvisor", "container (gVisor runsc, ptrace)", "gvisor"))


def measure(quick: bool, progress: Progress) -> list[Row]:
    """One row per runtime; a runtime that cannot run here is a missing row with its reason."""
    kernel = build_kernel("cpu_kernel", NATIVE)
    programs = build_native(ROOT / "build" / "native")
    policy = Policy(filesystem=FilesystemPolicy(readonly={
        KERNELS: kernel.parent, PROGRAMS: programs["cpu_work"].parent}))
    rows = []
    for row_id, label, runtime in RUNTIMES:
        progress.show(f"{row_id}: startup")
        tier = ContainerTier(runtime=runtime)
        available = tier.availability()
        if not available.ok:
            tier.close()
            rows.append(missing(row_id, label, "container", available.reason))
            progress.step(f"{row_id}: missing")
            progress.step(f"{row_id}: missing")
            progress.step(f"{row_id}: missing")
            progress.step(f"{row_id}: missing")
            continue
        gvisor = runtime is not None
        row = Row(row_id, label, "container")
        row.notes.append(available.reason)
        with Sandbox(policy, tiers={TierName.CONTAINER: lambda t=tier: t}) as sb:  # type: ignore[misc]
            _measure_runtime(sb, row, kernel.name, quick, gvisor, progress)
        rows.append(row)
    return rows


def _measure_runtime(sb: Sandbox, row: Row, kernel: str, quick: bool, gvisor: bool,
                     progress: Progress) -> None:
    true = Task.command(["/bin/true"])
    for _ in range(2):
        check(sb.run(true))  # namespaces, root skeleton, page cache
    true_cpu, true_run = [], []
    for _ in range((3 if gvisor else 10) if quick else (15 if gvisor else 50)):
        r = check(sb.run(true))
        # runsc boots its Sentry inside what the tier calls run: startup is until exit.
        row.startup_s.append(r.metrics.startup_s + r.metrics.run_s)
        row.wall_s.append(r.metrics.wall_s)
        row.cleanup_s.append(r.metrics.extra["teardown_s"] + r.metrics.cleanup_s)
        true_cpu.append(r.metrics.cpu_s or 0.0)
        true_run.append(r.metrics.run_s)
    row.cleanup_what = "tier teardown (extra.teardown_s) + workspace removal"
    row.notes.append("startup: tier startup + run of /bin/true (until the trivial task exited)")
    base_cpu, base_run = statistics.median(true_cpu), statistics.median(true_run)
    progress.step(f"{row.id}: exec")
    iterations = "20000000" if quick else "40000000"
    work = Task.command([f"{KERNELS}/{kernel}", iterations])

    def boxed() -> tuple[float, float]:
        r = check(sb.run(work))
        return (r.metrics.cpu_s or r.metrics.run_s) - base_cpu, r.metrics.run_s - base_run

    def natively() -> tuple[float, float]:
        wall, cpu = spawn([NATIVE / kernel, iterations])
        return cpu, wall

    row.exec_pairs = interleave(3 if quick else 9, boxed, natively)
    row.exec_what = (f"native cpu_kernel {iterations} iterations in the container (cgroup CPU) "
                     "vs fork+exec on the host (rusage CPU); the container side minus the "
                     "median CPU and run time of a /bin/true container (the runtime's own "
                     "start and exit)")
    progress.step(f"{row.id}: memory")
    probe = Task.command([f"{PROGRAMS}/cpu_work", "1"])
    for _ in range(2 if quick else 5):
        r = check(sb.run(probe))
        own = vm_hwm_bytes(r.stderr)
        peak = float(r.metrics.peak_memory_bytes or 0)
        row.memory_raw.append({"cgroup_peak": peak, "task_hwm": own})
        if peak and own:
            row.memory_overhead_bytes.append(peak - own)
    row.memory_what = ("container cgroup peak charge minus the task's own VmHWM (cpu_work 1); "
                       "near zero or below: file pages the host already cached are charged "
                       "to the host's cgroup, and crun itself is gone once the task starts")
    if not row.memory_overhead_bytes:
        row.memory_what = ("not measured: the tier reported no cgroup peak, or the task no "
                           "VmHWM, under this runtime")
    progress.step(f"{row.id}: throughput")
    n = (6 if gvisor else 20) if quick else (30 if gvisor else 200)
    row.throughput = throughput(n, CORES, lambda _: check(sb.run(true)))
    progress.step(f"{row.id}: done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    print_rows(measure(args.quick, NoProgress(STEPS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
