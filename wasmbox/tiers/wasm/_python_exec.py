"""Internal: one Python task in a fresh instance of the interpreter component (wasm tier).

A fresh Store under the plan's limits, one instance of the snapshot and one call
``run(source, filename, entry, input, paths)``; its verdict and any trap become the Outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import wasmtime
from wasmtime import component

from wasmbox.errors import HostFailure
from wasmbox.lifecycle import Deadline
from wasmbox.models import Status
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.wasm.engine import EngineHandle, first_line
from wasmbox.tiers.wasm.instance_pool import Pooled
from wasmbox.tiers.wasm.run import arm, limit_store, record_exit, settle, wasi_config
from wasmbox.workspace import RESULT_FILE, Workspace

TASK_FILENAME = "<task>"
# The snapshot instantiates a handful of core modules (interpreter, libc, adapters): the
# task cannot create instances itself, so the runtime's own need is the floor.
MIN_INSTANCES = 32
_REASON_CHARS = 500
ARGV = ("python",)
# The pool's first call into each new instance (`warm_up`): ours, no task code and no I/O, a
# main that takes and returns JSON like a task's. The first call into an instance costs ~3x
# a later one (its memory and the interpreter's lazy state touched for the first time).
WARM_SOURCE = (
    "import json\n"
    "def main(inp):\n"
    "    return {'n': len(json.dumps(inp)), 'xs': sorted(inp['xs'])}\n"
)
WARM_INPUT = '{"xs": [2.5, 1], "s": "x", "n": null, "b": true}'
_WARM_VALUE = json.dumps({"n": len(json.dumps(json.loads(WARM_INPUT))), "xs": [1, 2.5]})


@dataclass(frozen=True)
class Interpreter:
    """A compiled interpreter component and the linker that instantiates it."""

    handle: EngineHandle
    component: component.Component
    linker: component.Linker


def execute(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
            interp: Interpreter,
            store: wasmtime.Store, payload: str, paths: list[str], mounts: dict[str, Path],
            t0: float, pooled: Pooled | None = None) -> Outcome:
    """Run the plan's source in a fresh instance in `store` (or the `pooled` one made and
    warmed for it, never used by a task before); guest faults are statuses. Closes the
    store."""
    wasi, clock_origin = wasi_config(plan, workspace, list(ARGV), mounts)
    store.set_wasi(wasi)
    watchdog, _ = arm(store, plan, workspace, deadline, monitor, interp.handle, clock_origin,
                      min_instances=MIN_INSTANCES)
    if pooled is not None and plan.fuel is not None:
        # As if instantiated here; never below 0 (set_fuel would wrap it to 2**64).
        store.set_fuel(max(0, plan.fuel - pooled.fuel_spent))

    outcome = Outcome(status=Status.COMPLETED, exit_code=0)
    verdict = None
    instantiated = False
    try:
        instance = (interp.linker.instantiate(store, interp.component) if pooled is None
                    else pooled.instance)
        instantiated = True
        run = instance.get_func(store, "run")
        if run is None:
            raise HostFailure("the Python component exports no run function")
        t1 = time.perf_counter()
        cpu0 = time.thread_time()
        outcome.startup_s = t1 - t0
        try:
            verdict = run(store, plan.task.source or "", TASK_FILENAME, plan.task.entry,
                          payload, paths)
        finally:
            outcome.run_s = time.perf_counter() - t1
            outcome.cpu_s = time.thread_time() - cpu0
    except (wasmtime.ExitTrap, wasmtime.Trap) as exc:
        record_exit(outcome, exc)
        if isinstance(exc, wasmtime.ExitTrap) and exc.code != 0:  # os._exit() inside the task
            outcome.reason = f"the task exited with code {exc.code}"
    except wasmtime.WasmtimeError as exc:
        outcome.exit_code = None
        if watchdog.tripped is None:
            outcome.status, outcome.trap, outcome.reason = _classify_error(exc, instantiated, plan)

    if verdict is not None:
        _apply_verdict(outcome, verdict, plan, workspace)
    settle(outcome, plan, store, watchdog, deadline, monitor)
    return outcome


def pool_world(store: wasmtime.Store, plan: Plan) -> None:
    """A pooled instance's Store before its warm-up: the task's argv and env (the
    interpreter reads them once, on its first call) and nothing else: no preopens, no stdio;
    the plan's store limits and fuel."""
    wasi = wasmtime.WasiConfig()
    wasi.argv = list(ARGV)
    if plan.env:
        wasi.env = list(plan.env.items())
    store.set_wasi(wasi)
    limit_store(store, plan, MIN_INSTANCES)


def warm_up(store: wasmtime.Store, instance: component.Instance, fuel: bool) -> int:
    """The first call into a pooled instance (`WARM_SOURCE`); raises `HostFailure` unless
    it returned its known value, and the pool drops the instance.

    With `fuel`, calls it a second time and returns what the first call burnt beyond the
    second: the interpreter's lazy start, which the fresh path charges to the task's call.
    """
    run = instance.get_func(store, "run")
    if run is None:
        raise HostFailure("the Python component exports no run function")
    burnt = []
    for _ in range(2 if fuel else 1):
        before = store.get_fuel() if fuel else 0
        verdict = run(store, WARM_SOURCE, "<warm-up>", "main", WARM_INPUT, [])
        if verdict.code != 0 or verdict.value != _WARM_VALUE:
            raise HostFailure(f"the interpreter's warm-up failed: {verdict.code} "
                              f"{verdict.error}")
        burnt.append(before - store.get_fuel() if fuel else 0)
    return burnt[0] - burnt[-1]


def _apply_verdict(outcome: Outcome, verdict: component.Record, plan: Plan,
                   workspace: Workspace) -> None:
    code: int = verdict.code
    value: str | None = verdict.value
    error: str | None = verdict.error
    outcome.exit_code = code
    if code != 0:
        outcome.status = Status.FAILED
        outcome.reason = (error or f"exit code {code}")[:_REASON_CHARS]
        if error is not None and error.startswith("MemoryError"):
            outcome.status = Status.MEMORY_EXCEEDED
            outcome.reason = f"MemoryError: the task reached its {plan.memory} byte memory cap"
        return
    if value is None:
        return
    data = value.encode()
    cap = plan.output.max_file_bytes
    if len(data) > cap:
        outcome.status = Status.OUTPUT_REJECTED
        outcome.reason = f"{RESULT_FILE} exceeds {cap} bytes"
        return
    _write_result(os.path.join(workspace.output_dir, RESULT_FILE), data)


def _write_result(path: str, data: bytes) -> None:
    # The guest may have left its own result.json (or a symlink, or a directory): the return
    # value wins, as in runner.py, and is never written through a link.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# Component calls report traps as errors whose last line names the cause.
_TRAP_CAUSES = (
    ("all fuel consumed", Status.OUT_OF_FUEL, "out_of_fuel"),
    ("interrupt", Status.TIMEOUT, "interrupt"),
    ("call stack exhausted", Status.CRASHED, "stack_overflow"),
)


def _classify_error(exc: wasmtime.WasmtimeError, instantiated: bool,
                    plan: Plan) -> tuple[Status, str | None, str]:
    message = first_line(str(exc))
    if not instantiated:
        if "memory" in message or "limit" in message:
            return (Status.MEMORY_EXCEEDED, None,
                    f"the interpreter needs more than {plan.memory} bytes")
        raise HostFailure(f"the Python component cannot be instantiated: {message}") from exc
    cause = _last_line(str(exc))
    for needle, status, trap in _TRAP_CAUSES:
        if needle in cause:
            return status, trap, cause
    return Status.CRASHED, None, cause


def _last_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[-1].strip() if text else "unknown error"
