"""Python tasks in the wasm tier by phase: cold build, warm load, per task; vs `python3 -c`.

Run: ``python3 benchmarks/bench_python_phases.py [--runs N]`` (stdlib + wasmbox only).
cold  = build the CPython component + compile it + first task, in an empty cache;
warm  = a new Sandbox on a filled cache (deserialize) + first task;
task  = steady-state per task through ``Sandbox.run`` (median and p90 of N runs), two ways:
        "gaps" waits (untimed) for the pool of warmed interpreters to refill before each
        task, as a caller with gaps between tasks sees it; "back-to-back" does not.
        Each is split into phases (medians): startup (the tier's run up to the guest call:
        pool take or instantiation, WASI world, watchdog), guest (the ``run`` call), and
        the rest (the sandbox's plan, prepare, workspace, outputs, Result; store close).
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

from pydantic import JsonValue

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
TASKS: dict[str, tuple[str, JsonValue]] = {
    "hello": (HELLO, {"name": "x"}), "json-2000-rows": (JSON_HEAVY, {"n": 2000}),
}


def sandbox(cache: Path) -> wasmbox.Sandbox:
    return wasmbox.Sandbox(tiers={TierName.WASM: lambda: WasmTier(cache)})


def first_task(cache: Path) -> float:
    t0 = time.perf_counter()
    with sandbox(cache) as sb:
        r = sb.run(wasmbox.Task.python(HELLO, input={"name": "x"}, tier=TierName.WASM))
        assert r.ok, r
    return time.perf_counter() - t0


REFILL_WAIT_S = 1.0


def refilled(sb: wasmbox.Sandbox) -> None:
    """Wait (up to `REFILL_WAIT_S`) until the wasm tier's pool of warmed Python interpreters
    is full again, as it is for a caller whose tasks come with gaps between them."""
    pool = sb._tier(TierName.WASM)._python_runtime().pool  # type: ignore[attr-defined]
    end = time.monotonic() + REFILL_WAIT_S
    while pool.warmed < pool.size and time.monotonic() < end:
        time.sleep(0.001)


Phases = tuple[float, float, float]  # wall, startup, guest


def per_task(cache: Path, source: str, payload: JsonValue, runs: int,
             gaps: bool) -> list[Phases]:
    task = wasmbox.Task.python(source, input=payload, tier=TierName.WASM)
    with sandbox(cache) as sb:
        for _ in range(5):
            assert sb.run(task).ok
        times = []
        for _ in range(runs):
            if gaps:
                refilled(sb)
            t0 = time.perf_counter()
            r = sb.run(task)
            wall = time.perf_counter() - t0
            assert r.ok, r
            times.append((wall, r.metrics.startup_s, r.metrics.run_s))
    return times


def phases(times: list[Phases]) -> str:
    wall, startup, guest = (statistics.median(column) * 1e3 for column in zip(*times, strict=True))
    return (f"startup {startup:6.2f}  guest {guest:6.2f}  rest {wall - startup - guest:6.2f} "
            "ms (medians)")


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
            for gaps in (True, False):
                wasm = per_task(cache, source, payload, args.runs, gaps)
                how = "gaps" if gaps else "back-to-back"
                print(f"{name:16} wasm, {how:12} {describe([t[0] for t in wasm])}")
                print(f"{'':16} {'':18} {phases(wasm)}")
            sub = subprocess_python(source, payload, max(20, args.runs // 10))
            print(f"{name:16} python3 -c       {describe(sub)}")


if __name__ == "__main__":
    main()
