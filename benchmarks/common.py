"""What every tier benchmark shares: the row it fills, native timing, statistics, progress.

A tier benchmark returns `Row`s: raw samples only (seconds, bytes), never summaries, so the
suite can compute medians and percentiles the same way for every tier and keep every sample.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "build" / "guests"
NATIVE = GUESTS / "native"
CORES = os.cpu_count() or 1


@dataclass
class Pair:
    """One interleaved run of the same work in the tier and natively (CPU and wall seconds)."""

    tier_cpu_s: float
    native_cpu_s: float
    tier_wall_s: float
    native_wall_s: float

    @property
    def cpu_ratio(self) -> float:
        return self.tier_cpu_s / self.native_cpu_s


@dataclass
class Row:
    """Every sample of one tier (or baseline); empty lists where a measure does not apply.

    startup_s:  the tier's own startup metric per trivial task (or a baseline's whole run);
    wall_s:     the whole ``Sandbox.run`` of the trivial task;
    cleanup_s:  teardown after the task exited, as defined in `cleanup_what`;
    exec_pairs: the same CPU work in the tier and natively, interleaved (`exec_what`);
    memory_overhead_bytes: what the sandbox adds over the task's own use (`memory_what`);
    throughput: tasks completed on `concurrency` threads and the seconds it took.
    """

    id: str
    label: str
    claim: str | None  # the seed's row this tier is compared with, None for baselines
    available: bool = True
    reason: str = ""
    startup_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cleanup_s: list[float] = field(default_factory=list)
    cleanup_what: str = ""
    exec_pairs: list[Pair] = field(default_factory=list)
    exec_what: str = ""
    memory_overhead_bytes: list[float] = field(default_factory=list)
    memory_what: str = ""
    memory_raw: list[dict[str, float]] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # tasks/s of each round (scaling rows)
    group: str = ""  # "peers" / "scaling": reported in a section of their own, not the tier table
    compare_to: str | None = None  # the id of the row this one's ratio is taken against

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exec_ratios"] = [p.cpu_ratio for p in self.exec_pairs]
        return data


def missing(id: str, label: str, claim: str | None, reason: str) -> Row:
    """A row for a tier that cannot run here, with the reason."""
    return Row(id, label, claim, available=False, reason=reason)


def spawn(argv: Sequence[str | Path]) -> tuple[float, float]:
    """fork+exec `argv` to completion: (wall seconds, child CPU seconds from wait4 rusage)."""
    t0 = time.perf_counter()
    # Exit status ignored: natively the guests find no /task to write to, the work is the same.
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = 0  # reaped by wait4 above
    return wall, usage.ru_utime + usage.ru_stime


def throughput(n: int, concurrency: int, one: Callable[[int], object]) -> dict[str, float]:
    """Run `one(i)` for i in range(n) on `concurrency` threads; tasks/s over the whole batch."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - t0
    return {"tasks": n, "concurrency": concurrency, "elapsed_s": elapsed,
            "tasks_per_s": n / elapsed}


def check(result: Any) -> Any:
    """The result if it completed; a benchmark task that fails stops the benchmark."""
    if not result.ok:
        raise RuntimeError(f"benchmark task failed: {result.status} {result.reason} "
                           f"{result.stderr[-300:]}")
    return result


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def check_all(results: Sequence[Any]) -> None:
    """A batch in which any task failed stops the benchmark."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} benchmark tasks failed: {bad[0].status} {bad[0].reason}")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile (the maximum for fewer than 20 samples)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * 95 // 100) - 1))]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "median": median(values), "p95": p95(values)}


class Progress:
    """A one-line progress bar on stderr: steps done of `total`, the current step, elapsed."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def step(self, label: str) -> None:
        """Mark one step done; `label` names what runs next."""
        self.done = min(self.done + 1, self.total)
        self.show(label)

    def show(self, label: str) -> None:
        width = 24
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = f"\r[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:5.1f}s {label}"
        self.stream.write(line[:110].ljust(110))
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class NoProgress(Progress):
    """For standalone scripts: steps are not shown."""

    def show(self, label: str) -> None:
        pass

    def finish(self) -> None:
        pass


def interleave(reps: int, tier: Callable[[], tuple[float, float]],
               native: Callable[[], tuple[float, float]]) -> list[Pair]:
    """`reps` pairs, the native run and the tier run back to back, alternating which is first,
    so drift in machine load hits both alike. Each callable returns (cpu_s, wall_s)."""
    pairs = []
    for i in range(reps):
        if i % 2:
            t_cpu, t_wall = tier()
            n_cpu, n_wall = native()
        else:
            n_cpu, n_wall = native()
            t_cpu, t_wall = tier()
        pairs.append(Pair(t_cpu, n_cpu, t_wall, n_wall))
    return pairs


def vm_hwm_bytes(text: str) -> int:
    """The ``VmHWM:`` line of a /proc status dump (as printed by cpu_work), in bytes."""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
