"""CPU a hello task costs through the service's runners, without HTTP or the journal.

Runs WASI hello tasks through `ProcessRunner` (the calling process plus its runner
processes) or `ThreadRunner` (this process), one at a time or from N threads, and prints one
JSON line: CPU per task of the calling process and of the runner processes, and tasks/s.

``--pause-us`` makes each task wait that long before it starts: a thread runner then sleeps
between tasks as a runner process does while its parent works, which shows what going idle
alone costs the next task (caches another process evicted meanwhile).

    PYTHONPATH=. python3 benchmarks/bench_runner_cpu.py --runner processes [--concurrency 8]
    PYTHONPATH=. python3 benchmarks/bench_runner_cpu.py --runner threads --pause-us 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import GUESTS, cpu_seconds
from wasmbox.models import Policy, Status, Task
from wasmbox.service._runners import ProcessRunner, Runner, ThreadRunner

WARM_UP = 50


def measure(runner_kind: str, tasks: int, concurrency: int, pause: float) -> dict[str, object]:
    """Run the tasks and return the row."""
    hello = (GUESTS / "hello.wasm").read_bytes()
    policies = {"default": Policy()}
    runner: Runner
    if runner_kind == "processes":
        process_runner = ProcessRunner(policies, processes=min(concurrency, os.cpu_count() or 1))
        runner, pids = process_runner, process_runner.pids
    else:
        runner, pids = ThreadRunner(policies), []

    def one(i: int) -> None:
        if pause:
            time.sleep(pause)
        result = runner.run("default", Task.wasm(hello, input={"n": i}))
        if result.status is not Status.COMPLETED:
            raise RuntimeError(f"hello did not complete: {result.status} {result.reason}")

    try:
        for i in range(WARM_UP):
            one(i)
        runners0, own0, wall0 = cpu_seconds(pids), time.process_time(), time.perf_counter()
        if concurrency == 1:
            for i in range(tasks):
                one(i)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(tasks)))
        wall = time.perf_counter() - wall0
        own, runners = time.process_time() - own0, cpu_seconds(pids) - runners0
    finally:
        runner.close()
    return {"runner": runner_kind, "concurrency": concurrency, "tasks": tasks,
            "pause_us": pause * 1e6, "caller_cpu_ms": 1e3 * own / tasks,
            "runner_cpu_ms": 1e3 * runners / tasks, "total_cpu_ms": 1e3 * (own + runners) / tasks,
            "tasks_per_s": tasks / wall, "load1": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runner", choices=["processes", "threads"], default="processes")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--pause-us", type=float, default=0.0)
    args = parser.parse_args(argv)
    row = measure(args.runner, args.tasks, args.concurrency, args.pause_us / 1e6)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
