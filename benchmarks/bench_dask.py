"""Dask scale-out: tasks/s of `DistributedSandbox.map` with 1 and 2 workers, beside local.

For two kinds of task, hello (``hello.wasm``: start-up dominated, ~1 ms) and CPU-bound
(``cpu_kernel.wasm`` with a few million iterations, tens of ms), three ways run the same batch:

- ``Sandbox.map`` in this process on 1 thread: the local reference;
- `DistributedSandbox.map` on a loopback ``LocalCluster`` of 1 worker process, one thread;
- the same with 2 worker processes, one thread each.

Both clusters are started (spawned workers, `cluster_config`) and warmed before the first
round, so their start-up is not timed; the rounds are interleaved (every way once per round,
rotating who goes first) and each row keeps every round's tasks/s. The per-task overhead of
Dask over local is the 1-worker row's seconds per task over the local row's. Client,
scheduler and workers share this machine's cores, so 2 workers on 2 cores also compete with
the client that decodes the results.

Run standalone: ``python3 benchmarks/bench_dask.py [--quick]``, or in the suite:
``python3 -m benchmarks --tiers dask``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CORES, GUESTS, Progress, Row, check_all, cpu_seconds  # noqa: E402
from benchmarks.report import scaling_lines, standalone  # noqa: E402
from guests.build import build  # noqa: E402
from wasmbox import Sandbox, Task  # noqa: E402
from wasmbox.models import Result  # noqa: E402

STEPS = 4
CPU_ITERATIONS = "3000000"  # cpu_kernel iterations a task: tens of ms in wasm here


def measure(quick: bool, progress: Progress) -> list[Row]:
    """Rows per kind of task: local, Dask 1 worker, Dask 2 workers (`rates`: tasks/s)."""
    import dask
    from distributed import Client, LocalCluster

    from wasmbox.distributed import DistributedSandbox, cluster_config

    wasm = build(GUESTS, ["hello", "cpu_kernel"])
    kinds = {
        "hello": (Task.wasm(wasm["hello"]), 300 if quick else 1000),
        "cpu": (Task.wasm(wasm["cpu_kernel"], args=(CPU_ITERATIONS,)), 60 if quick else 120),
    }
    rounds = 3 if quick else 7
    load_before = os.getloadavg()[0]
    progress.show("dask: starting clusters")
    rows: list[Row] = []
    started: dict[int, float] = {}
    with contextlib.ExitStack() as stack, Sandbox() as local:
        stack.enter_context(dask.config.set(cluster_config()))
        sandboxes: dict[int, DistributedSandbox] = {}
        pids: dict[int, list[int]] = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            cluster = stack.enter_context(LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                dashboard_address=None))
            client = stack.enter_context(Client(cluster))  # type: ignore[no-untyped-call]
            started[workers] = time.perf_counter() - t0
            sandboxes[workers] = DistributedSandbox(client)
            pids[workers] = list(client.run(os.getpid).values())
        progress.step("dask: warming")
        # Both clusters' schedulers, nannies and clients live in this process: their idle
        # CPU (heartbeats, monitors) is measured once and taken off each round's client CPU.
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(1.0)
        idle = (time.process_time() - c0) / (time.perf_counter() - t0)
        for kind, (task, n) in kinds.items():
            ways: list[tuple[Row, Callable[[list[Task]], list[Result]]]] = [
                (Row(f"dask:{kind}-local", f"{kind}: Sandbox.map here, 1 thread", None),
                 local.map),
                (Row(f"dask:{kind}-1", f"{kind}: Dask, 1 worker", None,
                     compare_to=f"dask:{kind}-local"), sandboxes[1].map),
                (Row(f"dask:{kind}-2", f"{kind}: Dask, 2 workers", None,
                     compare_to=f"dask:{kind}-1"), sandboxes[2].map),
            ]
            for _, run in ways:  # warm: every worker's sandbox and compiled module
                check_all(run(_batch(task, 8)))
            progress.step(f"dask: {kind} rounds")
            cpu: dict[str, list[tuple[float, float]]] = {row.id: [] for row, _ in ways}
            loads: list[float] = []
            for i in range(rounds):
                loads.append(os.getloadavg()[0])
                shift = i % len(ways)
                for row, run in ways[shift:] + ways[:shift]:
                    batch = _batch(task, n)
                    width = int(row.id.rsplit("-", 1)[1]) if row.id[-1].isdigit() else 0
                    c0, w0 = time.process_time(), cpu_seconds(pids.get(width, []))
                    t0 = time.perf_counter()
                    check_all(run(batch))
                    took = time.perf_counter() - t0
                    row.rates.append(n / took)
                    here = time.process_time() - c0 - (idle * took if width else 0.0)
                    cpu[row.id].append((max(here, 0.0) / n,
                                        (cpu_seconds(pids.get(width, [])) - w0) / n))
            local_rate = statistics.median(ways[0][0].rates)
            one = statistics.median(ways[1][0].rates)
            two = statistics.median(ways[2][0].rates)
            for row, _ in ways:
                row.group = "scaling"
                row.throughput = {"tasks": n, "rounds": rounds,
                                  "tasks_per_s": statistics.median(row.rates)}
                row.wall_s = [1 / rate for rate in row.rates]
            ways[0][0].notes.append(
                f"{n} tasks a round, {rounds} rounds; " + (
                    "hello.wasm" if kind == "hello"
                    else f"cpu_kernel.wasm {CPU_ITERATIONS} iterations"))
            ways[1][0].notes.append(
                f"per task {1e3 / one:.2f} ms vs {1e3 / local_rate:.2f} ms locally: "
                f"{local_rate / one:.2f}x local (overhead {1e3 / one - 1e3 / local_rate:.2f} ms "
                "a task)")
            # Other engineers' load drifts over seconds: each round's two batches ran next to
            # each other, so their ratio, round by round, is steadier than a ratio of medians.
            paired = [b / a for a, b in zip(ways[1][0].rates, ways[2][0].rates, strict=True)]
            each = ", ".join(f"{r:.2f}x at load {load:.1f}"
                             for r, load in zip(paired, loads, strict=True))
            ways[2][0].notes.append(f"1 -> 2 workers: {two / one:.2f}x tasks/s; round by round "
                                    f"{statistics.median(paired):.2f}x median ({each})")
            for width, (row, _) in enumerate(ways):
                here = statistics.median(c[0] for c in cpu[row.id])
                away = statistics.median(c[1] for c in cpu[row.id])
                if not width:
                    row.notes.append(f"CPU per task: {here * 1e3:.2f} ms")
                    continue
                ceiling = min(width / away if away else math.inf, 1 / here if here else math.inf,
                              CORES / (here + away) if here + away else math.inf)
                row.notes.append(
                    f"CPU per task: client and scheduler {here * 1e3:.2f} ms (less this "
                    f"process's idle {idle * 100:.0f}% of a core), workers "
                    f"{away * 1e3:.2f} ms; on {CORES} idle cores the ceiling is "
                    f"min({width}/workers, 1/client, {CORES}/(client + workers)) = "
                    f"{ceiling:.0f} tasks/s")
            rows += [row for row, _ in ways]
    rows[0].notes.append(
        f"cluster start-up, not timed: {started[1]:.1f} s (1 worker), {started[2]:.1f} s "
        f"(2 workers); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(the machine is shared)")
    progress.step("dask: done")
    return rows



def _batch(task: Task, n: int) -> list[Task]:
    """`n` distinct tasks like `task` (distinct ids: the cluster runs one id only once)."""
    return [task.model_copy(update={"id": f"{task.id}-{time.monotonic_ns()}-{i}"})
            for i in range(n)]



def main(argv: list[str] | None = None) -> int:
    return standalone(argv, __doc__, measure, STEPS, scaling_lines)


if __name__ == "__main__":
    sys.exit(main())
