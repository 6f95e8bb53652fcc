"""The wasm hello path phase by phase, and what three candidate fixes would save.

Run: ``python3 benchmarks/bench_wasm_phases.py [--runs N] [--cpu] [--part1]`` (wasmbox +
wasmtime only; ``--cpu``: part 1 in thread CPU time, ``--part1``: part 1 only).

Part 1 walks one ``Sandbox.run(Task.wasm(hello))`` step by step with the same functions the
sandbox and the wasm tier call (plan, prepare, workspace, WASI config, arm, instantiate,
guest ``_start``, settle, store drop, collect, cleanup, result) and times each; the sum is
printed beside a real ``Sandbox.run`` in the same loop, so a drift between this walk and the
tier (edited elsewhere) shows as a gap.

Part 2 prototypes fixes against raw wasmtime-py, the tier untouched, each variant beside the
same baseline in interleaved runs:
- ``pooling``: wasmtime's pooling instance allocator (``wasmtime_pooling_allocation_*`` via
  ``wasmtime._ffi``), slots sized for the default policy (256 MiB memories); and with 1 MiB
  of each memory and table kept resident between instances (what the tier now uses);
- ``memfd-stdio``: stdout/stderr into a memfd through ``wasi_config_set_stdout_custom`` with
  libc ``write`` as the callback (no host path opened, no Python per write, no blocking
  thread-pool hop that file-backed WASI streams take);
- ``reused-dir``: one task directory per worker, cleared between tasks, instead of a fresh
  workspace made and removed per task;
- ``no stdio``: stdout/stderr not captured at all: not a fix, the bound of what any cheaper
  capture could save.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import wasmtime  # noqa: E402
from wasmtime import _ffi as ffi  # noqa: E402

from benchmarks.common import GUESTS  # noqa: E402
from guests.build import build  # noqa: E402
from wasmbox import Sandbox, Task, telemetry  # noqa: E402
from wasmbox._results import assemble, check_task_json, collect  # noqa: E402
from wasmbox.lifecycle import Deadline, shielded  # noqa: E402
from wasmbox.models import Limits, Status  # noqa: E402
from wasmbox.monitor import Monitor  # noqa: E402
from wasmbox.policy import apply  # noqa: E402
from wasmbox.tiers.base import Outcome  # noqa: E402
from wasmbox.tiers.wasm.engine import use_pooling  # noqa: E402
from wasmbox.tiers.wasm.run import arm, call_start, close_store, settle, wasi_config  # noqa: E402
from wasmbox.tiers.wasm.tier import WasmPrepared, _export, _memories  # noqa: E402
from wasmbox.workspace import Workspace, remove_tree  # noqa: E402

PHASES = ("plan", "prepare", "workspace", "wasi config", "arm", "instantiate", "guest _start",
          "settle", "store drop", "collect", "cleanup", "result")


# --- part 1: the real path, phase by phase -------------------------------------------------


def walk(sb: Sandbox, task: Task, clock: Callable[[], float] = time.perf_counter,
         ) -> dict[str, float]:
    """One hello run through the sandbox's and the tier's own steps, in the sandbox's order
    and with its arguments; seconds of `clock` per phase."""
    marks: list[tuple[str, float]] = []
    t0 = clock()

    def mark(name: str) -> None:
        marks.append((name, clock()))

    plan = apply(sb.policy, task)
    data = check_task_json(plan)
    mark("plan")
    _, ready, _, _ = sb._choose(plan)
    assert isinstance(ready, WasmPrepared)
    handle, prepared, pre, plan = ready.handle, ready.module, ready.pre, ready.plan
    assert prepared is not None and pre is not None
    mark("prepare")
    deadline, monitor = Deadline(plan.timeout), Monitor(plan.policy.monitor)
    workspace = Workspace(plan, sb.config.workspace_root, data=data)
    mark("workspace")
    store = wasmtime.Store(handle.engine)
    wasi, clock_origin = wasi_config(plan, workspace, ["hello.wasm"])
    store.set_wasi(wasi)
    mark("wasi config")
    watchdog, watch = arm(store, plan, workspace, deadline, monitor, handle, clock_origin)
    mark("arm")
    instance = pre.instantiate(store)
    watch.memories = _memories(_export(store, instance, n) for n in prepared.memory_exports)
    start = _export(store, instance, "_start")
    assert isinstance(start, wasmtime.Func)
    mark("instantiate")
    outcome = Outcome(status=Status.COMPLETED, exit_code=0)
    try:
        call_start(store, start, prepared.plain_start)
    except wasmtime.ExitTrap as exc:
        outcome.exit_code = exc.code
    mark("guest _start")
    outcome.peak_memory_bytes = watch.memory_bytes()
    settle(outcome, plan, store, watchdog, deadline, monitor)
    mark("settle")
    close_store(store)  # settle dropped it already: idempotent, as in the tier's finally
    mark("store drop")
    collected = collect(plan, workspace, outcome)
    mark("collect")
    with shielded():
        workspace.close()
    mark("cleanup")
    result = assemble(plan, outcome, collected, monitor, cleanup_s=0.0, wall_s=0.0)
    telemetry.record(result)
    mark("result")
    assert result.ok and result.output == {"greeting": "hello"}, result
    out, last = {}, t0
    for name, at in marks:
        out[name] = at - last
        last = at
    return out


def part1(module: Path, runs: int, cpu: bool = False) -> None:
    """Wall time per phase, or with `cpu` this thread's CPU time (what the host spends,
    without the waits a loaded machine adds; wasmtime's worker threads are not counted)."""
    task = Task.wasm(module)
    clock = time.thread_time if cpu else time.perf_counter
    with Sandbox() as sb:
        for _ in range(30):
            walk(sb, task, clock)
            sb.run(task)
        phases: dict[str, list[float]] = {name: [] for name in PHASES}
        totals, real = [], []
        for _ in range(runs):
            sample = walk(sb, task, clock)
            for name, seconds in sample.items():
                phases[name].append(seconds)
            totals.append(sum(sample.values()))
            t0 = clock()
            sb.run(task)
            real.append(clock() - t0)
    what = "thread CPU" if cpu else "wall"
    print(f"Part 1: Sandbox.run(Task.wasm(hello)) by phase, {runs} runs, median {what} µs (p90)")
    whole = statistics.median(totals)
    for name in PHASES:
        mid = statistics.median(phases[name])
        print(f"  {name:14} {mid * 1e6:7.0f} ({_p90(phases[name]) * 1e6:6.0f})  "
              f"{mid / whole * 100:4.0f}%")
    print(f"  {'sum of phases':14} {whole * 1e6:7.0f} ({_p90(totals) * 1e6:6.0f})")
    print(f"  {'Sandbox.run':14} {statistics.median(real) * 1e6:7.0f} ({_p90(real) * 1e6:6.0f})")


# --- part 2: prototypes against raw wasmtime-py --------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_WRITE = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte),
                          ctypes.c_size_t)
_FINAL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# libc's own write(fd, buf, n) has the callback's shape when `data` carries the fd (the
# SysV ABI passes both in the same register), so no Python runs per guest write; getpid
# ignores its argument and stands in for a no-op finalizer.
_LIBC_WRITE = ctypes.cast(_libc.write, _WRITE)
_NO_FINAL = ctypes.cast(_libc.getpid, _FINAL)


RAW_PHASES = ("dir", "wasi config", "instantiate", "guest _start", "store drop", "read back",
              "remove dir")


class Raw:
    """A minimal hello runner on raw wasmtime-py with the default policy's limits."""

    def __init__(self, module: Path, *, pooling: bool = False, memfd: bool = False,
                 reuse_dir: bool = False, stdio: bool = True, keep_resident: int = 0) -> None:
        self.limits = Limits()
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.max_wasm_stack = self.limits.stack
        config.cranelift_opt_level = "speed"
        if pooling:
            use_pooling(config, memory=self.limits.memory, keep_resident=keep_resident)
        self.engine = wasmtime.Engine(config)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(wasmtime.Module.from_file(self.engine, str(module)))
        self.memfd = memfd
        self.stdio = stdio
        self.reuse_dir = reuse_dir
        self.root = tempfile.mkdtemp(prefix="bench-phases-", dir=_shm())
        self.fds = (os.memfd_create("stdout"), os.memfd_create("stderr")) if memfd else None
        if reuse_dir:
            self.task_dir = self._make(self.root + "/reused")

    def _make(self, path: str) -> str:
        os.mkdir(path)
        os.mkdir(path + "/task")
        os.mkdir(path + "/task/output")
        fd = os.open(path + "/task/input.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.write(fd, b"null")
        os.close(fd)
        return path

    def once(self) -> dict[str, float]:
        """Run hello once; seconds per phase."""
        t = [time.perf_counter()]
        if self.reuse_dir:
            path = self.task_dir
            _clear(path + "/task/output")
        else:
            path = self._make(f"{self.root}/w{time.perf_counter_ns()}")
        t.append(time.perf_counter())
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.limits.memory, table_elements=100_000,
                         instances=4, tables=4, memories=4)
        store.set_fuel(self.limits.fuel or 0)
        store.set_epoch_deadline(10_000)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello.wasm"]
        if self.fds is not None:
            for fd in self.fds:
                os.ftruncate(fd, 0)
            ffi.wasi_config_set_stdout_custom(wasi.ptr(), _LIBC_WRITE, self.fds[0], _NO_FINAL)
            ffi.wasi_config_set_stderr_custom(wasi.ptr(), _LIBC_WRITE, self.fds[1], _NO_FINAL)
        elif self.stdio:
            wasi.stdout_file = path + "/stdout"
            wasi.stderr_file = path + "/stderr"
        wasi.preopen_dir(path + "/task", "/task", False)
        wasi.preopen_dir(path + "/task/output", "/task/output", True)
        store.set_wasi(wasi)
        t.append(time.perf_counter())
        instance = self.pre.instantiate(store)
        start = instance.exports(store)["_start"]
        t.append(time.perf_counter())
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise
        t.append(time.perf_counter())
        store.close()
        t.append(time.perf_counter())
        if self.fds is not None:
            stdout = os.pread(self.fds[0], 1 << 20, 0)
            os.lseek(self.fds[0], 0, os.SEEK_SET)
            os.lseek(self.fds[1], 0, os.SEEK_SET)
        elif self.stdio:
            with open(path + "/stdout", "rb") as f:
                stdout = f.read()
        else:
            stdout = b"hello from wasm\n"  # not captured: the lower bound of stdio's cost
        with open(path + "/task/output/result.json", "rb") as f:
            result = f.read()
        if stdout != b"hello from wasm\n" or result != b'{"greeting":"hello"}':
            raise RuntimeError(f"hello went wrong: {stdout!r} {result!r}")
        t.append(time.perf_counter())
        if not self.reuse_dir:
            remove_tree(path)
        t.append(time.perf_counter())
        return dict(zip(RAW_PHASES, (b - a for a, b in itertools.pairwise(t)), strict=True))

    def close(self) -> None:
        if self.fds is not None:
            for fd in self.fds:
                os.close(fd)
        remove_tree(self.root)
        self.engine.close()


def _clear(path: str) -> None:
    """Empty the directory at `path`, keeping it."""
    for name in os.listdir(path):
        remove_tree(os.path.join(path, name))


def part2(module: Path, runs: int) -> None:
    variants: dict[str, Callable[[], Raw]] = {
        "baseline (files, fresh dir)": lambda: Raw(module),
        "pooling allocator": lambda: Raw(module, pooling=True),
        "pooling, 1 MiB resident": lambda: Raw(module, pooling=True, keep_resident=1 << 20),
        "memfd stdio (no host file)": lambda: Raw(module, memfd=True),
        "reused task dir": lambda: Raw(module, reuse_dir=True),
        "no stdio at all (bound)": lambda: Raw(module, stdio=False),
        "pooling + reused dir": lambda: Raw(module, pooling=True, reuse_dir=True),
    }
    runners = {name: make() for name, make in variants.items()}
    try:
        for runner in runners.values():
            for _ in range(30):
                runner.once()
        samples: dict[str, dict[str, list[float]]] = {
            name: {phase: [] for phase in (*RAW_PHASES, "total")} for name in runners}
        order = list(runners.items())
        for i in range(runs):
            shift = i % len(order)
            for name, runner in order[shift:] + order[:shift]:
                phases = runner.once()
                for phase, seconds in phases.items():
                    samples[name][phase].append(seconds)
                samples[name]["total"].append(sum(phases.values()))
    finally:
        for runner in runners.values():
            runner.close()
    print(f"\nPart 2: raw wasmtime-py hello, interleaved, {runs} runs, median µs per phase")
    print("  " + " " * 28 + "".join(f"{p[:11]:>12}" for p in (*RAW_PHASES, "total")))
    base = samples["baseline (files, fresh dir)"]
    for name, by_phase in samples.items():
        cells = "".join(f"{statistics.median(v) * 1e6:12.0f}" for v in by_phase.values())
        print(f"  {name:28}{cells}")
    print("  saving vs baseline, median of the total: " + ", ".join(
        f"{name} {(statistics.median(base['total']) - statistics.median(v['total'])) * 1e6:+.0f} µs"
        for name, v in samples.items() if v is not base))


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def _shm() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--cpu", action="store_true",
                        help="part 1 in this thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--part1", action="store_true", help="skip the part 2 prototypes")
    args = parser.parse_args(argv)
    module = build(GUESTS, ["hello"])["hello"]
    print(f"wasmtime {version('wasmtime')}, load average {os.getloadavg()[0]:.2f}")
    part1(module, args.runs, args.cpu)
    if not args.part1:
        part2(module, args.runs)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
