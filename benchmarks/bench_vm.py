"""The VM tier: a guest booted per task (cold) and a guest booted ahead (pooled).

- startup: the tier's startup metric for ``true`` (cold: until the booted guest is ready;
  pooled: until the task is handed to a guest that was already waiting; we wait for the pool
  to be warm before each task, so this is the best case of a pool that keeps up);
- cleanup: ``wall - startup - run``: QEMU kill, run-dir and workspace removal, output
  collection, plus the facade's ~1 ms of planning (the tier reports no teardown of its own);
- exec: a busybox shell loop, guest CPU (the guest's cgroup) against the host's busybox
  running the same loop (rusage CPU). Under TCG this is the emulator's cost, not a
  virtualisation overhead; measured once, on pooled guests, and shared by both rows;
- memory: QEMU's RSS after the task minus the task's peak inside the guest (guest kernel,
  page cache and QEMU itself are all overhead);
- throughput: ``true`` tasks on every core (pooled: the pool refills by booting, so the
  steady state is bounded by boots too).

A snapshot/restore row is reported as not built: the tier has no such path.

Run standalone: ``python3 benchmarks/bench_vm.py [--quick]`` (needs qemu-system-x86 and the
VM assets: ``python3 -m wasmbox.tiers.vm.assets`` or the tier's prepare command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    CORES,
    NoProgress,
    Pair,
    Progress,
    Row,
    check,
    interleave,
    missing,
    spawn,
    throughput,
)
from benchmarks.report import print_rows  # noqa: E402
from wasmbox import Policy, Result, Sandbox, Task  # noqa: E402
from wasmbox.models import TierName, TimeoutPolicy  # noqa: E402
from wasmbox.policy import apply  # noqa: E402
from wasmbox.tiers.vm.tier import VmTier  # noqa: E402

STEPS = 5
WARM_TIMEOUT = 60.0
SNAPSHOT_REASON = ("not built: the VM tier has no snapshot/restore path (DESIGN.md measured a "
                   "hand-made QEMU migrate/-incoming restore at ~0.24 s per task)")


def loop(iterations: int) -> str:
    return f"i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done"


def measure(quick: bool, progress: Progress) -> list[Row]:
    """Rows vm-cold, vm-pooled and vm-snapshot (always missing, with the reason)."""
    snapshot = missing("vm-snapshot", "VM (snapshot restore)", "VM", SNAPSHOT_REASON)
    probe = VmTier(pool_size=0)
    available = probe.availability()
    probe.close()
    if not available.ok:
        for _ in range(STEPS):
            progress.step("vm: missing")
        return [missing("vm-cold", "VM cold boot (QEMU)", "VM", available.reason),
                missing("vm-pooled", "VM pooled (QEMU)", "VM", available.reason), snapshot]
    true = Task.command(["true"], tier="vm")
    # Boots take 1.5 s quiet but several under load; the default 10 s deadline is too tight.
    policy = Policy(timeouts=TimeoutPolicy(run=60.0))
    reps = 2 if quick else 8
    tasks = CORES if quick else 4 * CORES

    progress.show("vm-cold: startup")
    cold = Row("vm-cold", "VM cold boot (QEMU)", "VM")
    cold_tier = VmTier(pool_size=0)
    with Sandbox(policy, tiers={TierName.VM: lambda: cold_tier}) as sb:
        # One-off costs (assets, KVM probe) are in prepare, outside the tier's startup metric.
        for _ in range(reps):
            _record(cold, check(sb.run(true)))
        progress.step("vm-cold: throughput")
        _throughput(cold, tasks, lambda: check(sb.run(true)))
    progress.step("vm-pooled: startup")

    pooled = Row("vm-pooled", "VM pooled (QEMU, booted ahead)", "VM")
    pool_tier = VmTier(pool_size=CORES)
    with Sandbox(policy, tiers={TierName.VM: lambda: pool_tier}) as sb:
        pool_tier.prepare(apply(policy, true))  # starts warming the pool for this shape
        for _ in range(reps):
            pool_tier.wait_warm(WARM_TIMEOUT)
            _record(pooled, check(sb.run(true)))
        progress.step("vm: exec")
        pooled.exec_pairs = _exec_pairs(sb, pool_tier, 10000 if quick else 30000, reps)
        progress.step("vm-pooled: throughput")
        pool_tier.wait_warm(WARM_TIMEOUT)
        _throughput(pooled, tasks, lambda: check(sb.run(true)))
    accel = "KVM" if cold.memory_raw and cold.memory_raw[0].get("kvm") else "TCG"
    for row in (cold, pooled):
        row.notes.append(f"accelerator: {accel}")
        row.exec_what = (f"busybox shell loop under {accel}: guest cgroup CPU vs host busybox "
                         "rusage CPU (measured once on pooled guests, shared by both rows)")
        row.memory_what = "QEMU RSS after the task minus the task's peak inside the guest"
        row.cleanup_what = "wall - startup - run: QEMU kill, dirs, collection, facade planning"
    cold.exec_pairs = pooled.exec_pairs
    progress.step("vm: done")
    return [cold, pooled, snapshot]


def _throughput(row: Row, n: int, once: Callable[[], object]) -> None:
    try:
        row.throughput = throughput(n, CORES, lambda _: once())
    except RuntimeError as exc:  # a boot that outlived its deadline on a loaded host
        row.notes.append(f"throughput not measured: {exc}")


def _record(row: Row, r: Result) -> None:
    m = r.metrics
    row.startup_s.append(m.startup_s)
    row.wall_s.append(m.wall_s)
    row.cleanup_s.append(m.wall_s - m.startup_s - m.run_s)
    rss = m.extra.get("qemu_rss_bytes")
    if rss is not None:
        own = float(m.peak_memory_bytes or 0)
        row.memory_raw.append({"qemu_rss": rss, "task_peak": own, "kvm": m.extra.get("kvm", 0.0),
                               "guest_ram_mib": m.extra.get("guest_memory_mib", 0.0)})
        row.memory_overhead_bytes.append(rss - own)


def _exec_pairs(sb: Sandbox, tier: VmTier, iterations: int, reps: int) -> list[Pair]:
    script = loop(iterations)
    task = Task.command(["sh", "-c", script], tier="vm")

    def guest() -> tuple[float, float]:
        tier.wait_warm(WARM_TIMEOUT)
        r = check(sb.run(task))
        return r.metrics.cpu_s or r.metrics.run_s, r.metrics.run_s

    def host() -> tuple[float, float]:
        wall, cpu = spawn(["busybox", "sh", "-c", script])
        return cpu, wall

    return interleave(reps, guest, host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    print_rows(measure(args.quick, NoProgress(STEPS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
