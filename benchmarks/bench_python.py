"""Python tasks in the wasm tier (CPython for WASI), and the ``python3 -c`` subprocess baseline.

- startup/cleanup: ``Sandbox.run`` of a hello task (fresh interpreter state every task);
- exec: a pure-Python loop, guest CPython (3.14, WASI) against the host's ``python3`` running
  the same source; tier CPU seconds (the whole call, so ~2 ms of instantiation is included)
  against the loop's own ``time.process_time()`` natively. The interpreters differ in version;
- memory: as for wasm modules, in a fresh process (component, store, guest heap together: the
  guest's own heap is not reported separately, so it counts as overhead here);
- throughput: hello tasks through ``Sandbox.run`` on every core; ``python3 -c`` the same.

Run standalone: ``python3 benchmarks/bench_python.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_wasm import memory_probe  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CORES,
    NoProgress,
    Progress,
    Row,
    check,
    interleave,
    throughput,
)
from benchmarks.report import print_rows  # noqa: E402
from wasmbox import Sandbox, Task  # noqa: E402

STEPS = 4
HELLO = "def main(inp):\n    return {'hello': inp['name']}\n"
LOOP = (
    "import time\n"
    "def main(inp):\n"
    "    t0, c0 = time.perf_counter(), time.process_time()\n"
    "    x = 0\n"
    "    for i in range(inp['n']):\n"
    "        x = (x * 31 + i) % 1000003\n"
    "    return {'x': x, 'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0}\n"
)


def measure(quick: bool, progress: Progress) -> list[Row]:
    """The Python-in-wasm row and the ``python3 -c`` baseline row."""
    row = Row("python", "Python in wasm (CPython/WASI)", "language runtime")
    base = Row("python3-c", "baseline: python3 -c subprocess", None)
    hello = Task.python(HELLO, input={"name": "x"}, tier="wasm")
    with Sandbox() as sb:
        progress.show("python: startup")
        for _ in range(5):
            check(sb.run(hello))
        for _ in range(20 if quick else 200):
            r = check(sb.run(hello))
            row.startup_s.append(r.metrics.startup_s)
            row.wall_s.append(r.metrics.wall_s)
            row.cleanup_s.append(r.metrics.cleanup_s)
        for _ in range(5 if quick else 30):
            base.startup_s.append(_python_c(HELLO, {"name": "x"})[0])
        row.cleanup_what = "workspace removal (Result.metrics.cleanup_s)"
        base.notes.append("startup = whole python3 -c run of the hello task")
        progress.step("python: exec")
        n = 500_000 if quick else 2_000_000
        loop = Task.python(LOOP, input={"n": n}, tier="wasm")

        def in_wasm() -> tuple[float, float]:
            r = check(sb.run(loop))
            return r.metrics.cpu_s or r.metrics.run_s, float(r.output["wall"])

        def natively() -> tuple[float, float]:
            out = _python_c(LOOP, {"n": n})[1]
            return out["cpu"], out["wall"]

        row.exec_pairs = interleave(3 if quick else 9, in_wasm, natively)
        row.exec_what = (f"pure-Python loop of {n} steps: guest CPython vs host python3 "
                         f"{sys.version.split()[0]}")
        progress.step("python: memory")
        for _ in range(1 if quick else 3):
            probe = memory_probe("python", HELLO)
            row.memory_raw.append(probe)
            row.memory_overhead_bytes.append(probe["hwm_after"] - probe["rss_before"])
        row.memory_what = "fresh process: peak RSS over 3 hello runs minus RSS before"
        progress.step("python: throughput")
        row.throughput = throughput(40 if quick else 400, CORES, lambda _: check(sb.run(hello)))
        base.throughput = throughput(8 if quick else 80, CORES,
                                     lambda _: _python_c(HELLO, {"name": "x"}))
    base.wall_s = list(base.startup_s)
    progress.step("python: done")
    return [row, base]


def _python_c(source: str, payload: object) -> tuple[float, dict[str, float]]:
    """Run `source`'s main(payload) in ``python3 -c``: (wall seconds, its JSON output)."""
    code = f"{source}\nimport json\nprint(json.dumps(main({json.dumps(payload)})))\n"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    print_rows(measure(args.quick, NoProgress(STEPS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
