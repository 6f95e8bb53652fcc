"""The task journal's writer thread: its CPU and voluntary context switches per task.

Drives a `TaskStore` as the service does, without HTTP or sandboxes: `--submitters` threads
each journal a task (one module, as clients naming it by digest do) and wait for it to be
durable; `--workers` threads claim each one, and record its result without waiting for that
commit; a run is `--run-ms` of Python holding the GIL (the Python around a WASI hello
run), so the writer contends for the GIL as it does in the service (whose GIL switch interval
it uses). Every write goes through the one writer thread, whose CPU time and voluntary context
switches (from ``/proc/self/task``) are reported per task, with tasks/s. Linux only.

    python3 benchmarks/bench_journal.py [--tasks 4000] [--submitters 8] [--workers 2]
                                        [--run-ms 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wasmbox import Result, Status, Task, TierName
from wasmbox.service import SWITCH_INTERVAL_S
from wasmbox.service.store import TaskStore

# A small valid module (the journal stores its bytes, it never runs them).
MODULE = bytes.fromhex("0061736d01000000") + b"\x00\x08\x04name" + bytes(4000)


def thread_counters(native_id: int) -> tuple[float, int]:
    """CPU seconds and voluntary context switches so far of one thread of this process."""
    base = f"/proc/self/task/{native_id}"
    with open(f"{base}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"{base}/status", encoding="ascii") as f:
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", f.read(), re.M)
    return cpu, int(found.group(1)) if found else 0


def run(tasks: int, submitters: int, workers: int, run_s: float) -> dict[str, float]:
    """Journal, claim and finish `tasks` tasks; the writer thread's cost per task."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        return _run(tasks, submitters, workers, run_s)
    finally:
        sys.setswitchinterval(before)


def _run(tasks: int, submitters: int, workers: int, run_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = TaskStore(Path(tmp) / "tasks.db")
        try:
            writer = next(t for t in threading.enumerate() if t.name == "wasmbox-journal")
            assert writer.native_id is not None
            queued: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            finished = threading.Semaphore(0)

            def submit(count: int) -> None:
                for _ in range(count):
                    task = Task.wasm(MODULE)
                    store.add("bench", "default", task)
                    queued.put(task.id)

            def work() -> None:
                while (task_id := queued.get()) is not None:
                    if store.claim(task_id) is None:
                        continue
                    until = time.perf_counter() + run_s
                    while time.perf_counter() < until:
                        pass
                    result = Result(task_id=task_id, run_id="r", tier=TierName.WASM,
                                    status=Status.COMPLETED)
                    store.finish(task_id, result, 0.001, lambda _f: finished.release())

            submit(1)  # the module is stored once before the clock starts
            first = queued.get()
            assert first is not None and store.claim(first) is not None
            cpu0, vcsw0 = thread_counters(writer.native_id)
            started = time.perf_counter()
            running = [threading.Thread(target=work) for _ in range(workers)]
            share = [tasks // submitters + (i < tasks % submitters) for i in range(submitters)]
            running += [threading.Thread(target=submit, args=(n,)) for n in share]
            for thread in running:
                thread.start()
            for _ in range(tasks):
                finished.acquire()
            elapsed = time.perf_counter() - started
            cpu1, vcsw1 = thread_counters(writer.native_id)
            for _ in range(workers):
                queued.put(None)
            for thread in running:
                thread.join()
        finally:
            store.close()
    return {"tasks_per_s": tasks / elapsed, "writer_ms_per_task": (cpu1 - cpu0) / tasks * 1e3,
            "writer_vcsw_per_task": (vcsw1 - vcsw0) / tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--run-ms", type=float, default=0.5, help="Python per run (GIL held)")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args()
    row = run(args.tasks, args.submitters, args.workers, args.run_ms / 1e3)
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{row['tasks_per_s']:.0f} tasks/s; writer {row['writer_ms_per_task']:.3f} ms CPU "
              f"and {row['writer_vcsw_per_task']:.2f} voluntary switches per task")


if __name__ == "__main__":
    main()
