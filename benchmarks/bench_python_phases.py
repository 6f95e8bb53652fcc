"""Python tasks in the wasm tier by phase: cold build, warm load, per task; vs `python3 -c`.

Run: ``python3 benchmarks/bench_python_phases.py [--runs N]`` (stdlib + wasmbox only).
cold  = build the CPython component + compile it + first task, in an empty cache;
warm  = a new Sandbox on a filled cache (deserialize) + first task;
task  = steady-state per task through ``Sandbox.run`` (median and p90 of N runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wasmbox
from wasmbox.models import TierName
from wasmbox.tiers.wasm import WasmTier

HELLO = "def main(inp):\n    return {'hello': inp['name']}\n"
JSON_HEAVY = (
    "import json\n"
    "def main(inp):\n"
    "    rows = [{'id': i, 'name': f'row{i}', 'tags': ['a', 'b'], 'score': i * 0.5}\n"
    "            for i in range(inp['n'])]\n"
    "    text = json.dumps(rows)\n"
    "    back = json.loads(text)\n"
    "    return {'bytes': len(text), 'total': sum(r['score'] for r in back)}\n"
)
TASKS = {"hello": (HELLO, {"name": "x"}), "json-2000-rows": (JSON_HEAVY, {"n": 2000})}


def sandbox(cache: Path) -> wasmbox.Sandbox:
    return wasmbox.Sandbox(tiers={TierName.WASM: lambda: WasmTier(cache)})


def first_task(cache: Path) -> float:
    t0 = time.perf_counter()
    with sandbox(cache) as sb:
        r = sb.run(wasmbox.Task.python(HELLO, input={"name": "x"}, tier=TierName.WASM))
        assert r.ok, r
    return time.perf_counter() - t0


def per_task(cache: Path, source: str, payload: object, runs: int) -> list[float]:
    task = wasmbox.Task.python(source, input=payload, tier=TierName.WASM)
    with sandbox(cache) as sb:
        for _ in range(5):
            assert sb.run(task).ok
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            r = sb.run(task)
            times.append(time.perf_counter() - t0)
            assert r.ok, r
    return times


def subprocess_python(source: str, payload: object, runs: int) -> list[float]:
    code = source + f"\nimport json\nprint(json.dumps(main({json.dumps(payload)!s})))\n"
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def describe(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10)
    return f"p50 {statistics.median(times) * 1e3:8.2f} ms   p90 {q[-1] * 1e3:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-python-") as tmp:
        cache = Path(tmp)
        print(f"cold (build + compile + first task): {first_task(cache):7.2f} s")
        print(f"warm (load cached + first task):     {first_task(cache) * 1e3:7.1f} ms")
        for name, (source, payload) in TASKS.items():
            wasm = per_task(cache, source, payload, args.runs)
            print(f"{name:16} wasm tier        {describe(wasm)}")
            sub = subprocess_python(source, payload, max(20, args.runs // 10))
            print(f"{name:16} python3 -c       {describe(sub)}")


if __name__ == "__main__":
    main()
