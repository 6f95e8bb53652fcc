"""A burst of first runs of one module the cache has never seen: wall and CPU time.

Run: ``python3 benchmarks/bench_compile_burst.py [--runs 32] [--rounds 5] [--base TREE]``.

Each round runs ``hello.wasm`` with a fresh custom section appended (so no cache, in memory or
on disk, has seen it) `--runs` times at once through ``Sandbox.map``, in a fresh process with a
memory-only module cache, and reports the round's wall time, its CPU time (the process and its
reaped children: the compile workers) and how many runs completed or were refused. With
``--base TREE`` (a checkout of the code to compare against) the rounds alternate between that
tree and this one, each round with ``uptime``'s load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_round(runs: int) -> dict[str, float]:
    """The burst itself, in this process: import wasmbox from ``sys.path`` as given."""
    from wasmbox import Sandbox, Status, Task
    from wasmbox.models import TierName
    from wasmbox.tiers.wasm.tier import WasmTier

    tag = uuid.uuid4().hex.encode()
    data = (ROOT / "build/guests/hello.wasm").read_bytes() + b"\x00" + bytes(
        [len(tag) + 2, 1]) + b"t" + tag
    task = Task.wasm(data, input={"n": 1})
    with Sandbox(tiers={TierName.WASM: lambda: WasmTier(None)}) as sandbox:
        t0 = time.perf_counter()
        results = sandbox.map([task] * runs, concurrency=runs, return_exceptions=True)
        wall = time.perf_counter() - t0
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    completed = sum(1 for r in results if getattr(r, "status", None) is Status.COMPLETED)
    return {"wall_s": wall, "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
            "completed": completed, "refused": runs - completed}


def spawn_round(tree: Path, runs: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, __file__, "--one", "--runs", str(runs)], env=env,
                          capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base", type=Path, help="a checkout to compare against")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_round(args.runs)))
        return
    sides = {"base": args.base, "this": ROOT} if args.base else {"this": ROOT}
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for n in range(args.rounds):
        for side, tree in sides.items():
            load = os.getloadavg()[0]
            row = spawn_round(tree, args.runs)
            rows[side].append(row)
            print(f"round {n} {side:4} load {load:5.2f} wall {row['wall_s']:6.2f} s "
                  f"cpu {row['cpu_s']:6.2f} s completed {row['completed']:.0f} "
                  f"refused {row['refused']:.0f}", flush=True)
    for side, got in rows.items():
        print(f"median {side:4} wall {statistics.median(r['wall_s'] for r in got):6.2f} s "
              f"cpu {statistics.median(r['cpu_s'] for r in got):6.2f} s "
              f"refused {statistics.median(r['refused'] for r in got):.0f}/{args.runs}")


if __name__ == "__main__":
    main()
