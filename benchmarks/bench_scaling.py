"""Throughput of a batch of hello tasks across cores: threads vs spawned worker processes.

Four ways to run the same batch (``hello.wasm``, default policy), each timed over whole
batches in interleaved rounds (every way once per round, rotating who goes first):

- in-process ``Sandbox.map`` on 1 thread (the reference) and on ``CORES`` threads;
- `wasmbox.procpool.ProcessPool` with 1 worker process and with ``CORES`` workers (each worker
  a spawned process with its own warm Sandbox; results sent back per chunk).

Pools are started (and warmed) before the first round: their start-up is reported, not timed.
Run standalone: ``python3 benchmarks/bench_scaling.py [--quick]``
"""

from __future__ import annotations

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
from wasmbox.procpool import ProcessPool  # noqa: E402

STEPS = 3


def measure(quick: bool, progress: Progress) -> list[Row]:
    """One row per way of running the batch; `rates` holds tasks/s of every round."""
    progress.show("scaling: starting worker processes")
    hello = Task.wasm(build(GUESTS, ["hello"])["hello"])
    n, rounds = (400, 3) if quick else (2000, 9)
    cores = max(2, CORES)
    load_before = os.getloadavg()[0]
    with Sandbox() as sb:
        t0 = time.perf_counter()
        one = ProcessPool(processes=1)
        started_one = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            many = ProcessPool(processes=cores)
            started_many = time.perf_counter() - t0
            try:
                ways: list[tuple[Row, Callable[[list[Task]], list[Result]]]] = [
                    (Row("scaling:threads-1", "Sandbox.map, 1 thread", None),
                     lambda ts: sb.map(ts)),
                    (Row("scaling:threads-n", f"Sandbox.map, {cores} threads", None,
                         compare_to="scaling:threads-1"),
                     lambda ts: sb.map(ts, concurrency=cores)),
                    (Row("scaling:procs-1", "ProcessPool, 1 process", None,
                         compare_to="scaling:threads-1"), lambda ts: one.map(ts)),
                    (Row("scaling:procs-n", f"ProcessPool, {cores} processes", None,
                         compare_to="scaling:procs-1"), lambda ts: many.map(ts)),
                ]
                for _, run in ways:  # warm: compiled module, first workspaces, page cache
                    check_all(run([hello] * (4 * cores)))
                progress.step("scaling: rounds")
                workers = {"scaling:procs-1": one, "scaling:procs-n": many}
                cpu: dict[str, list[tuple[float, float]]] = {r.id: [] for r, _ in ways}
                for i in range(rounds):
                    shift = i % len(ways)
                    for row, run in ways[shift:] + ways[:shift]:
                        pool = workers.get(row.id)
                        pids = pool.pids if pool is not None else []
                        c0, w0 = time.process_time(), cpu_seconds(pids)
                        t0 = time.perf_counter()
                        check_all(run([hello] * n))
                        row.rates.append(n / (time.perf_counter() - t0))
                        cpu[row.id].append(((time.process_time() - c0) / n,
                                            (cpu_seconds(pids) - w0) / n))
            finally:
                many.close()
        finally:
            one.close()
    rows = [row for row, _ in ways]
    for row in rows:
        row.group = "scaling"
        row.throughput = {"tasks": n, "rounds": rounds, "tasks_per_s": statistics.median(row.rates)}
    rows[0].notes.append(
        f"{n} hello tasks a round, {rounds} rounds; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (the machine is shared)")
    rows[2].notes.append(f"pool start-up (spawn, import, Sandbox), not timed: "
                         f"{started_one:.2f} s")
    rows[3].notes.append(f"pool start-up, not timed: {started_many:.2f} s; default chunks "
                         "(about 4 a worker, at most 64 tasks)")
    for row in rows:
        parent = statistics.median(c[0] for c in cpu[row.id])
        worker = statistics.median(c[1] for c in cpu[row.id])
        if row.id.startswith("scaling:procs"):
            width = 1 if row.id.endswith("-1") else cores
            ceiling = min(width / worker, 1 / parent) if worker and parent else 0.0
            row.notes.append(
                f"CPU per task: parent {parent * 1e6:.0f} µs, workers {worker * 1e6:.0f} µs; "
                f"with {width} free core(s) the ceiling is min({width}/worker, 1/parent) = "
                f"{ceiling:.0f} tasks/s")
        else:
            row.notes.append(f"CPU per task (all threads): {parent * 1e6:.0f} µs")
    ref = statistics.median(rows[0].rates)
    versus = statistics.median(rows[3].rates) / ref
    rows[3].notes.append(f"vs Sandbox.map on 1 thread: {versus:.2f}x")
    progress.step("scaling: done")
    return rows




def main(argv: list[str] | None = None) -> int:
    return standalone(argv, __doc__, measure, STEPS, scaling_lines)


if __name__ == "__main__":
    sys.exit(main())
