"""The container tier: cold and pooled startup, teardown, memory and execution overhead.

Run: ``python3 benchmarks/bench_container.py [--runs N]`` (stdlib + wasmbox only; needs root
and crun or runc). Every number is the median of N runs through ``Sandbox.run``:

startup   = from the tier's entry to the task's program running (bundle, create, start);
wall      = the whole ``Sandbox.run`` (workspace, container, wait, teardown, collection);
teardown  = metrics read + kill/reap + runtime delete + cgroup removal;
idle mem  = what one pooled, created-but-not-started container's cgroup is charged for;
peak RSS  = a task's own peak RSS in a container and run directly, and its cgroup's peak charge;
exec      = a fixed CPU kernel's run time in a container against running it directly.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guests.native.build import build_native  # noqa: E402
from wasmbox import Policy, Result, Sandbox, Task  # noqa: E402
from wasmbox.models import FilesystemPolicy, TierName  # noqa: E402
from wasmbox.policy import apply  # noqa: E402
from wasmbox.tiers.container import ContainerTier  # noqa: E402

GUESTS = "/opt/guests"
WORK = "200"  # cpu_work: 200 million xorshift steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp:
        native = Path(tmp) / "native"
        build_native(native)
        native.chmod(0o755)
        policy = Policy(filesystem=FilesystemPolicy(readonly={GUESTS: native}))
        rows = measure(policy, native, args.runs)
    width = max(len(name) for name, _ in rows)
    print(f"container tier, medians of {args.runs} runs")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


def measure(policy: Policy, native: Path, runs: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    true = Task.command(["/bin/true"])
    with _sandbox(policy, ContainerTier()) as sb:
        sb.run(true)  # namespace, root skeleton, page cache
        cold = _repeat(runs, lambda: sb.run(true))
        rows += [
            ("cold startup (/bin/true)", _ms(cold, lambda r: r.metrics.startup_s)),
            ("cold wall (/bin/true)", _ms(cold, lambda r: r.metrics.wall_s)),
            ("cold teardown", _ms(cold, lambda r: r.metrics.extra["teardown_s"])),
        ]
        work = Task.command([f"{GUESTS}/cpu_work", WORK])
        boxed = _repeat(max(5, runs // 3), lambda: sb.run(work))
        direct_s, direct_rss = _direct(native / "cpu_work", max(5, runs // 3))
        boxed_s = statistics.median(r.metrics.run_s for r in boxed)
        rows += [
            (f"exec cpu_work {WORK}: container", f"{boxed_s * 1e3:8.1f} ms"),
            (f"exec cpu_work {WORK}: direct", f"{direct_s * 1e3:8.1f} ms"),
            ("exec overhead", f"{(boxed_s / direct_s - 1) * 100:8.1f} %"),
            ("cpu_work peak RSS: container",
             _kib(statistics.median(_hwm(r.stderr) for r in boxed))),
            ("cpu_work peak RSS: direct", _kib(direct_rss)),
            ("cpu_work cgroup peak charge",
             _kib(statistics.median(r.metrics.peak_memory_bytes or 0 for r in boxed))),
        ]
    gvisor = ContainerTier()
    if gvisor.runtime_availability("gvisor").ok:
        with _sandbox(policy, gvisor) as sb:
            task = Task.command(["/bin/true"], runtime="gvisor")
            sb.run(task)
            runsc = _repeat(max(3, runs // 6), lambda: sb.run(task))
            rows.append(("gVisor (runsc) wall (/bin/true)", _ms(runsc, lambda r: r.metrics.wall_s)))
    else:
        rows.append(("gVisor (runsc)", gvisor.runtime_availability("gvisor").reason))
        gvisor.close()
    tier = ContainerTier(pool_size=2)
    with _sandbox(policy, tier) as sb:
        pool = tier.prewarm(apply(policy, true))
        assert pool is not None
        pool.wait_ready()
        idle = pool.idle_memory()

        def pooled_run() -> Result:
            pool.wait_ready()
            return sb.run(true)

        pooled = _repeat(runs, pooled_run)
        assert all(r.metrics.extra.get("pooled") for r in pooled), "a run went cold"
        rows += [
            ("pooled startup (/bin/true)", _ms(pooled, lambda r: r.metrics.startup_s)),
            ("pooled wall (/bin/true)", _ms(pooled, lambda r: r.metrics.wall_s)),
            ("pooled teardown", _ms(pooled, lambda r: r.metrics.extra["teardown_s"])),
            ("idle mem per pooled container", _kib(statistics.median(idle) if idle else 0)),
        ]
    return rows


def _sandbox(policy: Policy, tier: ContainerTier) -> Sandbox:
    return Sandbox(policy, tiers={TierName.CONTAINER: lambda: tier})


def _repeat(runs: int, once: Callable[[], Result]) -> list[Result]:
    results = [once() for _ in range(runs)]
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"a benchmark run failed: {failed[0].status} {failed[0].stderr}")
    return results


def _direct(program: Path, runs: int) -> tuple[float, int]:
    times, rss = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([str(program), WORK], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        rss.append(_hwm(proc.stderr))
    return statistics.median(times), int(statistics.median(rss))


def _hwm(stderr: str) -> int:
    """The VmHWM line cpu_work prints (its own peak RSS), in bytes."""
    for line in stderr.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _ms(results: list[Result], pick: Callable[[Result], float]) -> str:
    values = sorted(pick(r) for r in results)
    p90 = values[int(len(values) * 0.9) - 1] if len(values) >= 10 else values[-1]
    return f"{statistics.median(values) * 1e3:8.2f} ms  (p90 {p90 * 1e3:.2f})"


def _kib(value: float) -> str:
    return f"{value / 1024:8.0f} KiB"


if __name__ == "__main__":
    sys.exit(main())
