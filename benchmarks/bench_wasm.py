"""wasm tier benchmark (WASI modules), and the native-process baseline it is compared with.

- startup/cleanup: ``Sandbox.run`` of the hello guest (tier startup metric, workspace removal);
- exec: the CPU kernel as wasm (fuel + epoch, the default policy) against the same C source
  built natively with ``cc -O2``, CPU seconds of interleaved pairs;
- memory: in a fresh Python process, peak RSS after three hello runs minus RSS before the
  first (engine, compiled module, store), minus the guest's own linear memory;
- throughput: hello tasks through ``Sandbox.map`` on every core.

Run standalone: ``python3 benchmarks/bench_wasm.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    CORES,
    GUESTS,
    NATIVE,
    NoProgress,
    Pair,
    Progress,
    Row,
    check,
    interleave,
    spawn,
    throughput,
)
from benchmarks.report import print_rows  # noqa: E402
from guests.build import build, build_native  # noqa: E402
from wasmbox import Policy, Sandbox, Task  # noqa: E402
from wasmbox.models import Limits  # noqa: E402

STEPS = 4  # progress steps `measure` reports

# Peak RSS of a fresh process around a few runs; /proc/self/clear_refs "5" resets VmHWM.
MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
from wasmbox import Sandbox, Task

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0

kind, arg = sys.argv[1], sys.argv[2]
if kind == "wasm":
    task = Task.wasm(Path(arg))
else:
    task = Task.python(arg, input={"name": "x"}, tier="wasm")
with Sandbox() as sb:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    peaks = []
    for _ in range(3):
        r = sb.run(task)
        assert r.ok, r
        peaks.append(r.metrics.peak_memory_bytes or 0)
    after = status("VmHWM:")
print(json.dumps({"rss_before": before, "hwm_after": after, "task_bytes": max(peaks)}))
"""


def measure(quick: bool, progress: Progress) -> list[Row]:
    """The wasm-module row and the fork+exec baseline row, every sample kept."""
    wasm = build(GUESTS, ["hello", "cpu_kernel"])
    native = {name: build_native(name, NATIVE) for name in ("hello", "cpu_kernel")}
    iterations = str(20_000_000 if quick else 40_000_000)
    row = Row("wasm", "wasm module (wasmtime)", "language runtime")
    base = Row("native", "baseline: fork+exec native", None)
    hello = Task.wasm(wasm["hello"])
    with Sandbox() as sb:
        progress.show("wasm: startup")
        for _ in range(20):
            check(sb.run(hello))
        for _ in range(50 if quick else 500):
            r = check(sb.run(hello))
            row.startup_s.append(r.metrics.startup_s)
            row.wall_s.append(r.metrics.wall_s)
            row.cleanup_s.append(r.metrics.cleanup_s)
            base.startup_s.append(spawn([native["hello"]])[0])
        row.cleanup_what = "workspace removal after the store is dropped (Result.metrics.cleanup_s)"
        base.notes.append("startup = whole fork+exec+wait of the native hello program")
        progress.step("wasm: exec")
        row.exec_pairs = _kernel_pairs(wasm["cpu_kernel"], native["cpu_kernel"], iterations,
                                       3 if quick else 9)
        row.exec_what = (f"cpu_kernel {iterations} iterations: wasm with fuel + epoch (tier "
                         "cpu_s, thread time) vs native cc -O2 (child rusage CPU)")
        progress.step("wasm: memory")
        for _ in range(1 if quick else 3):
            probe = memory_probe("wasm", str(wasm["hello"]))
            row.memory_raw.append(probe)
            row.memory_overhead_bytes.append(
                probe["hwm_after"] - probe["rss_before"] - probe["task_bytes"])
        row.memory_what = ("fresh process: peak RSS over 3 hello runs minus RSS before, minus "
                           "the guest's linear memory")
        progress.step("wasm: throughput")
        n = 400 if quick else 4000
        row.throughput = throughput(n, CORES, lambda _: check(sb.run(hello)))
        base.throughput = throughput(n // 4, CORES, lambda _: spawn([native["hello"]]))
        if CORES > 1:  # the GIL-bound share shows in how far 1 thread is from all cores
            one = throughput(n, 1, lambda _: check(sb.run(hello)))
            one_native = throughput(n // 4, 1, lambda _: spawn([native["hello"]]))
            row.notes.append(f"tasks/s on 1 thread: {one['tasks_per_s']:.0f}")
            base.notes.append(f"processes/s on 1 thread: {one_native['tasks_per_s']:.0f}")
    base.wall_s = list(base.startup_s)
    progress.step("wasm: done")
    return [row, base]


def _kernel_pairs(module: Path, native: Path, iterations: str, reps: int) -> list[Pair]:
    task = Task.wasm(module, args=(iterations,))
    with Sandbox(Policy(limits=Limits(fuel=10**12))) as sb:
        check(sb.run(task))  # compile outside the timed runs

        def in_wasm() -> tuple[float, float]:
            r = check(sb.run(task))
            return r.metrics.cpu_s or r.metrics.run_s, r.metrics.run_s

        def natively() -> tuple[float, float]:
            wall, cpu = spawn([native, iterations])
            return cpu, wall

        return interleave(reps, in_wasm, natively)


def memory_probe(kind: str, arg: str) -> dict[str, float]:
    """Run `MEMORY_PROBE` in a fresh interpreter for a wasm module path or Python source."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, arg], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe failed: {out.stderr.strip()[-400:]}")
    data: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    print_rows(measure(args.quick, NoProgress(STEPS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
