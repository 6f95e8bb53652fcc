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

Two rows for the default configuration, a pool that restores guests from a template snapshot:

- vm-snapshot: startup is the restore itself (a new QEMU started with ``-incoming`` until the
  guest, reseeded, says it can take a task), measured on guests the pool restored; end to end
  is ``true`` on such a guest, waiting for the pool to be warm first;
- vm-sustained: ``true`` tasks run back to back after a warm-up, never waiting for the pool
  (the issue-15 figure: the pool must keep up by restoring); startup is the wait for a guest.

Run standalone: ``python3 benchmarks/bench_vm.py [--quick]`` (needs qemu-system-x86; missing
or stale VM assets are prepared first, as ``python3 -m wasmbox.tiers.vm.assets`` would);
``--sustained 20 --runs 5`` prints the vm-sustained figure alone, five times.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
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
from wasmbox import Policy, Result, Sandbox, Status, Task  # noqa: E402
from wasmbox.models import TierName, TimeoutPolicy  # noqa: E402
from wasmbox.policy import apply  # noqa: E402
from wasmbox.tiers.base import Availability  # noqa: E402
from wasmbox.tiers.vm.assets import AssetError, prepare_assets  # noqa: E402
from wasmbox.tiers.vm.qemu import QEMU  # noqa: E402
from wasmbox.tiers.vm.tier import VmTier  # noqa: E402

STEPS = 7
WARM_TIMEOUT = 60.0


def loop(iterations: int) -> str:
    return f"i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done"


def _with_assets() -> Availability:
    """The VM tier's availability once its assets are prepared: missing or stale assets are
    built here, once, as the test suite's fixture does (the kernel download and images are
    one-off host costs, never part of a row)."""
    probe = VmTier(pool_size=0)
    try:
        available = probe.availability()
        if not available.ok and shutil.which(QEMU) is not None:
            try:
                prepare_assets()
            except (AssetError, OSError) as exc:
                return Availability(TierName.VM, False, f"VM assets cannot be prepared: {exc}")
            available = probe.availability()
        return available
    finally:
        probe.close()


def measure(quick: bool, progress: Progress) -> list[Row]:
    """Rows vm-cold, vm-pooled, vm-snapshot and vm-sustained."""
    available = _with_assets()
    if not available.ok:
        for _ in range(STEPS):
            progress.step("vm: missing")
        return [missing(id, label, "VM", available.reason) for id, label in (
            ("vm-cold", "VM cold boot (QEMU)"), ("vm-pooled", "VM pooled (QEMU)"),
            ("vm-snapshot", SNAPSHOT_LABEL), ("vm-sustained", SUSTAINED_LABEL))]
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
    pool_tier = VmTier(pool_size=CORES, snapshots=False)
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
    progress.step("vm-snapshot: restore")
    snapshot, sustained = _snapshot_rows(policy, true, reps, 6 if quick else 20, tasks, progress)
    for row in (snapshot, sustained):
        if row.available:
            row.notes.append(f"accelerator: {accel}")
            row.memory_what = pooled.memory_what
            row.cleanup_what = pooled.cleanup_what
            row.exec_pairs, row.exec_what = pooled.exec_pairs, pooled.exec_what
    progress.step("vm: done")
    return [cold, pooled, snapshot, sustained]


SNAPSHOT_LABEL = "VM restored from a snapshot (QEMU -incoming)"
SUSTAINED_LABEL = "VM sustained: back-to-back tasks, pool restoring"


def _snapshot_rows(policy: Policy, true: Task, reps: int, sequential: int, tasks: int,
                   progress: Progress) -> tuple[Row, Row]:
    snapshot = Row("vm-snapshot", SNAPSHOT_LABEL, "VM")
    sustained = Row("vm-sustained", SUSTAINED_LABEL, "VM")
    tier = VmTier(pool_size=1)  # the default configuration
    with Sandbox(policy, tiers={TierName.VM: lambda: tier}) as sb:
        tier.prepare(apply(policy, true))
        tier.wait_warm(WARM_TIMEOUT)
        check(sb.run(true))  # a shape's first guest boots; the pool makes the template next
        if not tier.wait_warm(WARM_TIMEOUT) or not tier.snapshots:
            reason = "; ".join(tier.snapshot_failures.values()) or "the pool never warmed"
            return (missing(snapshot.id, snapshot.label, "VM", reason),
                    missing(sustained.id, sustained.label, "VM", reason))
        restored = 0
        for _ in range(reps):
            tier.wait_warm(WARM_TIMEOUT)
            r = check(sb.run(true))
            _record(snapshot, r)
            ready = r.metrics.extra.get("machine_ready_s")
            if r.metrics.extra.get("restored") and ready is not None:
                snapshot.startup_s[-1] = ready  # the restore, not the (zero) wait for it
                restored += 1
        snapshot.notes.append(f"{restored}/{reps} tasks ran on restored guests; startup = "
                              "QEMU start with -incoming until the reseeded guest is armed")
        progress.step("vm-sustained: sequential")
        results = _sequential(sb, true, sequential)
        for r in results:
            if r.status is not Status.CRASHED:
                _record(sustained, r)
        sustained.notes.append(_sequential_note(results))
        progress.step("vm-sustained: throughput")
        _throughput(sustained, tasks, lambda: check(sb.run(true)))
    return snapshot, sustained


def _sequential(sb: Sandbox, true: Task, n: int) -> list[Result]:
    """`n` back-to-back tasks after 3 warm-up ones, never waiting for the pool.

    A task whose guest crashed is kept (the note counts it and gives its reason; it is not
    timed; the reason says how QEMU ended and how the console ended). The rare crash after
    arming seen until session 28 was the host reading the exit line late (fixed); one crash in
    ten is still reported rather than fatal, more stops the benchmark as any failure does.
    """
    for _ in range(3):
        check(sb.run(true))
    results: list[Result] = []
    for _ in range(n):
        r = sb.run(true)
        crashes = sum(x.status is Status.CRASHED for x in results)
        results.append(r if r.status is Status.CRASHED and crashes < max(1, n // 10)
                       else check(r))
    return results


def _sequential_note(all_results: list[Result]) -> str:
    crashed = [r for r in all_results if r.status is Status.CRASHED]
    results = [r for r in all_results if r.status is not Status.CRASHED]
    lost = (f"; {len(crashed)} of {len(all_results)} crashed (not timed): "
            f"{(crashed[0].reason or '')[:160]}" if crashed else "")
    walls = sorted(r.metrics.wall_s for r in results)
    p95 = walls[max(0, math.ceil(0.95 * len(walls)) - 1)]
    restored = sum(int(r.metrics.extra.get("restored", 0.0)) for r in results)
    over = [r.metrics.extra["qemu_rss_bytes"] - float(r.metrics.peak_memory_bytes or 0)
            for r in results if "qemu_rss_bytes" in r.metrics.extra]
    rss = (f", QEMU RSS over the task's peak {statistics.median(over) / 2**20:.1f} MiB"
           if over else "")
    return (f"{len(walls)} back-to-back tasks after 3 warm-up, {restored} on restored guests "
            f"(the rest booted cold); end to end median {statistics.median(walls) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms (issue 15 target: median <= 250 ms){rss}"
            f"{_cpu_note(results)}{lost}")


def _cpu_note(results: list[Result]) -> str:
    """QEMU's CPU time per task, split at the ready marker (median of each part): on a
    shared 2-core host the wall figure follows the load, CPU time far less so."""
    ready = [r.metrics.extra["qemu_ready_cpu_s"] for r in results
             if "qemu_ready_cpu_s" in r.metrics.extra]
    task = [r.metrics.extra["qemu_task_cpu_s"] for r in results
            if "qemu_task_cpu_s" in r.metrics.extra]
    if not ready or not task:
        return ""
    return (f", QEMU CPU per task {statistics.median(ready) * 1000:.0f} ms restoring + "
            f"{statistics.median(task) * 1000:.0f} ms running it")


def sustained(n: int, runs: int) -> None:
    """Print the vm-sustained figure alone, `runs` times: `n` sequential ``/bin/true`` after
    3 warm-up, on a fresh tier each run (its template made first, as in the row)."""
    if not _with_assets().ok:
        print("vm: not available")
        return
    true = Task.command(["/bin/true"], tier="vm")
    policy = Policy(timeouts=TimeoutPolicy(run=60.0))
    for i in range(runs):
        tier = VmTier(pool_size=1)
        with tier, Sandbox(policy, tiers={TierName.VM: tier}) as sb:
            tier.prepare(apply(policy, true))
            tier.wait_warm(WARM_TIMEOUT)
            check(sb.run(true))  # the shape's first guest boots; the template follows
            if not tier.wait_warm(WARM_TIMEOUT) or not tier.snapshots:
                print(f"run {i + 1}: no snapshot: {tier.snapshot_failures}")
                continue
            note = _sequential_note(_sequential(sb, true, n))
        print(f"run {i + 1}: {note}; load average {os.getloadavg()[0]:.2f}", flush=True)


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
    # The same busybox both sides: the guest's `sh` is the host's /bin/sh (dash) since the
    # guest shares the host's /usr.
    task = Task.command(["busybox", "sh", "-c", script], tier="vm")

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
    parser.add_argument("--sustained", type=int, metavar="N",
                        help="only the vm-sustained figure: N back-to-back tasks after 3 warm-up")
    parser.add_argument("--runs", type=int, default=1, help="with --sustained: how many times")
    args = parser.parse_args(argv)
    if args.sustained:
        sustained(args.sustained, args.runs)
        return 0
    print_rows(measure(args.quick, NoProgress(STEPS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
