"""wasm tier benchmark: hello end to end, throughput, and CPU overhead against native.

Every number is printed beside a native-process baseline measured in the same run:
- hello: ``Sandbox.run`` of the hello guest vs fork+exec of the same C program built natively;
- tasks/s on 1 and 2 threads: ``Sandbox.map`` vs the same number of native processes;
- CPU kernel: wasm (fuel + epoch on, and epoch only) vs native, medians of interleaved runs.

Run: ``python3 benchmarks/bench_wasm.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guests.build import build, build_native  # noqa: E402
from wasmbox import Policy, Sandbox, Status, Task  # noqa: E402
from wasmbox.models import Limits  # noqa: E402

KERNEL_ITERATIONS = 40_000_000


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print a table; returns every measurement."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    parser.add_argument("--json", type=Path, help="write all samples to this file")
    args = parser.parse_args(argv)
    out_dir = ROOT / "build" / "guests"
    wasm = build(out_dir, ["hello", "cpu_kernel"])
    native = {name: build_native(name, out_dir / "native") for name in ("hello", "cpu_kernel")}
    reps = 5 if args.quick else 15
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache, Sandbox() as sandbox:
        report["hello"] = bench_hello(sandbox, wasm["hello"], native["hello"], reps)
        report["throughput"] = bench_throughput(
            sandbox, wasm["hello"], native["hello"], 400 if args.quick else 2000
        )
        report["cpu_kernel"] = bench_kernel(
            wasm["cpu_kernel"], native["cpu_kernel"], 3 if args.quick else 7, Path(cache)
        )
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def bench_hello(sandbox: Sandbox, module: Path, native: Path, reps: int) -> dict[str, Any]:
    """Median µs per hello, end to end from Python, beside fork+exec of native hello."""
    task = Task.wasm(module)
    for _ in range(200):
        sandbox.run(task)
    wasm_batches, native_batches = [], []
    for _ in range(reps):
        wasm_batches.append(_per_call_us(lambda: _check(sandbox.run(task)), 200))
        native_batches.append(_per_call_us(lambda: _spawn(native), 50))
    return {
        "wasm_us_median": statistics.median(wasm_batches),
        "native_process_us_median": statistics.median(native_batches),
        "wasm_batches_us": wasm_batches,
        "native_batches_us": native_batches,
    }


def bench_throughput(sandbox: Sandbox, module: Path, native: Path, n: int) -> dict[str, Any]:
    """Tasks per second on 1 and 2 threads, beside native processes on 1 and 2 threads."""
    tasks = [Task.wasm(module) for _ in range(n)]
    result: dict[str, Any] = {}
    for threads in (1, 2):
        t0 = time.perf_counter()
        results = sandbox.map(tasks, concurrency=threads)
        elapsed = time.perf_counter() - t0
        assert all(r.status is Status.COMPLETED for r in results)
        result[f"wasm_tasks_per_s_{threads}"] = n / elapsed
        spawns = max(n // 10, 20)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: _spawn(native), range(spawns)))
        result[f"native_procs_per_s_{threads}"] = spawns / (time.perf_counter() - t0)
    return result


def bench_kernel(module: Path, native: Path, reps: int, cache: Path) -> dict[str, Any]:
    """wasm/native time ratio of the CPU kernel, with fuel + epoch and with epoch only."""
    fueled = Sandbox(Policy(limits=Limits(fuel=10**12)))
    unfueled = Sandbox(Policy(limits=Limits(fuel=None), allow_unbounded=True))
    task = Task.wasm(module, args=(str(KERNEL_ITERATIONS),))
    samples: dict[str, list[float]] = {"native": [], "fuel_epoch": [], "epoch_only": []}
    try:
        for sb in (fueled, unfueled):
            _check(sb.run(task))  # compile outside the timed runs
        for _ in range(reps):  # interleaved, so drift in machine load hits all three alike
            t0 = time.perf_counter()
            _spawn(native, str(KERNEL_ITERATIONS))
            samples["native"].append(time.perf_counter() - t0)
            samples["fuel_epoch"].append(_check(fueled.run(task)).metrics.run_s)
            samples["epoch_only"].append(_check(unfueled.run(task)).metrics.run_s)
    finally:
        fueled.close()
        unfueled.close()
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "iterations": KERNEL_ITERATIONS,
        "median_s": medians,
        "ratio_fuel_epoch": medians["fuel_epoch"] / medians["native"],
        "ratio_epoch_only": medians["epoch_only"] / medians["native"],
        "samples_s": samples,
    }


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary."""
    h, t, k = report["hello"], report["throughput"], report["cpu_kernel"]
    rows = [
        ("hello end to end (median)", f"{h['wasm_us_median']:.0f} µs",
         f"{h['native_process_us_median']:.0f} µs (fork+exec)"),
        ("tasks/s, 1 thread", f"{t['wasm_tasks_per_s_1']:.0f}",
         f"{t['native_procs_per_s_1']:.0f} procs/s"),
        ("tasks/s, 2 threads", f"{t['wasm_tasks_per_s_2']:.0f}",
         f"{t['native_procs_per_s_2']:.0f} procs/s"),
        ("CPU kernel, fuel + epoch", f"{k['ratio_fuel_epoch']:.2f}x native",
         f"{k['median_s']['native'] * 1e3:.0f} ms native"),
        ("CPU kernel, epoch only", f"{k['ratio_epoch_only']:.2f}x native", ""),
    ]
    print(f"{'measure':<28} {'wasm tier':>16}   baseline")
    for name, ours, base in rows:
        print(f"{name:<28} {ours:>16}   {base}")


def _per_call_us(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _spawn(binary: Path, *args: str) -> None:
    # Exit status ignored: natively the guests find no /task to write to, the work is the same.
    subprocess.run([str(binary), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _check(result: Any) -> Any:
    if result.status is not Status.COMPLETED:
        raise RuntimeError(f"benchmark task failed: {result.status} {result.reason}")
    return result


if __name__ == "__main__":
    main()
