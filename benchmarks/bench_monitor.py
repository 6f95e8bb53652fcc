"""Monitoring overhead: the same tasks with the monitor sampling every 10 ms and with it off.

Interleaved pairs, medians; the CPU kernel shows the per-sample cost on a long run, the hello
task the fixed per-run cost. Run: ``python3 benchmarks/bench_monitor.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import GUESTS, check  # noqa: E402
from guests.build import build  # noqa: E402
from wasmbox import Policy, Sandbox, Task  # noqa: E402
from wasmbox.models import Limits, MonitorPolicy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    guests = build(GUESTS, ["hello", "cpu_kernel"])
    on = Policy(limits=Limits(fuel=10**12), monitor=MonitorPolicy(interval="10ms"))
    off = Policy(limits=Limits(fuel=10**12), monitor=MonitorPolicy(enabled=False))
    kernel = Task.wasm(guests["cpu_kernel"], args=("20000000",))
    hello = Task.wasm(guests["hello"])
    reps, hellos = (3, 300) if args.quick else (9, 2000)
    with Sandbox(on) as sb_on, Sandbox(off) as sb_off:
        for sb in (sb_on, sb_off):
            check(sb.run(kernel))
        k_on, k_off, h_on, h_off = [], [], [], []
        for _ in range(reps):
            k_on.append(check(sb_on.run(kernel)).metrics.run_s)
            k_off.append(check(sb_off.run(kernel)).metrics.run_s)
            h_on.append(statistics.median(
                check(sb_on.run(hello)).metrics.wall_s for _ in range(hellos // reps)))
            h_off.append(statistics.median(
                check(sb_off.run(hello)).metrics.wall_s for _ in range(hellos // reps)))
        samples = len(check(sb_on.run(kernel)).events)
    k = statistics.median(k_on) / statistics.median(k_off) - 1
    print(f"cpu_kernel run: monitor on {statistics.median(k_on) * 1e3:.1f} ms, off "
          f"{statistics.median(k_off) * 1e3:.1f} ms: {k * 100:+.1f}% (events raised: {samples})")
    print(f"hello end to end: monitor on {statistics.median(h_on) * 1e6:.0f} µs, off "
          f"{statistics.median(h_off) * 1e6:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
