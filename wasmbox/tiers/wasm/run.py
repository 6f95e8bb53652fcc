"""What every wasm run shares, module or Python: arming a Store, the WASI view, fault mapping."""

from __future__ import annotations

import ctypes
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._func import enter_wasm

from wasmbox.errors import ConfigError
from wasmbox.lifecycle import Deadline
from wasmbox.models import Status
from wasmbox.monitor import Monitor, Sample
from wasmbox.policy import Plan
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.wasm import hostcalls
from wasmbox.tiers.wasm.engine import EngineHandle, Watchdog, first_line
from wasmbox.tiers.watch import RunWatch
from wasmbox.workspace import Workspace


class StoreProbe:
    """What a wasm run can measure: fuel burnt and linear memory, for `RunWatch` samples.

    `memories` is set once the instance exists: every memory the module exports (the engine
    allows only one; summing keeps the measure honest whatever the engine allows).
    """

    def __init__(self, plan: Plan, store: wasmtime.Store) -> None:
        self.plan = plan
        self.store = store
        self.memories: list[wasmtime.Memory] = []

    def memory_bytes(self) -> int | None:
        """Bytes of linear memory across all the instance's memories; None before it exists."""
        if not self.memories:
            return None
        return sum(int(m.data_len(self.store)) for m in self.memories)

    def __call__(self, base: Sample) -> Sample:
        plan = self.plan
        return dataclasses.replace(
            base, memory_bytes=self.memory_bytes(), memory_cap=plan.memory,
            fuel_consumed=plan.fuel - self.store.get_fuel() if plan.fuel is not None else None,
        )


def arm(
    store: wasmtime.Store,
    plan: Plan,
    workspace: Workspace,
    deadline: Deadline,
    monitor: Monitor,
    handle: EngineHandle,
    clock_origin_ns: int,
    *,
    min_instances: int = 0,
) -> tuple[Watchdog, StoreProbe]:
    """Apply the plan's limits and fuel to `store` and attach the per-tick watchdog (a
    `RunWatch`); returns it and the probe whose `memories` the caller sets.

    `clock_origin_ns` comes from `wasi_config`: the shadowed WASI calls (`hostcalls`) need
    the guest's monotonic clock. `min_instances` is the runtime's own need (a component
    instantiates several core modules); the guest itself can never create instances.
    """
    limit_store(store, plan, min_instances)
    probe = StoreProbe(plan, store)
    watchdog = Watchdog(RunWatch(deadline, monitor, probe, workspace).reason)
    watchdog.attach(store)
    hostcalls.register(store, hostcalls.RunHost(deadline, watchdog, clock_origin_ns,
                                                 handle.wasi_calls))
    handle.ensure_ticking()
    return watchdog, probe


def limit_store(store: wasmtime.Store, plan: Plan, min_instances: int = 0) -> None:
    """The plan's store limits and fuel on `store` (part of `arm`; the instance pool makes
    its instances under them too)."""
    instances = max(plan.instances, min_instances) + hostcalls.EXTRA_INSTANCES
    store.set_limits(
        memory_size=plan.memory,
        table_elements=plan.table_elements,
        instances=instances,
        tables=instances,
        memories=instances,
    )
    if plan.fuel is not None:
        store.set_fuel(plan.fuel)


def close_store(store: wasmtime.Store) -> None:
    """Drop a run's Store and everything it holds (its guest's open files included).

    Idempotent: `settle` closes the store early, the tier's ``finally`` again.
    """
    try:
        store._context()
    except ValueError:
        return  # already closed
    try:
        hostcalls.unregister(store)
    finally:
        store.close()


def wasi_config(
    plan: Plan, workspace: Workspace, argv: list[str], extra_readonly: dict[str, Path] | None = None
) -> tuple[wasmtime.WasiConfig, int]:
    """The guest's whole world: argv, the plan's env (never the host's), captured stdio, and
    exactly the /task preopens plus the mounts the policy grants.

    Also returns the guest's monotonic clock origin on the host's monotonic clock (wasmtime
    starts the guest's clock when the config is created; read just after, so an absolute
    wait computed from it ends late by microseconds, never early). `arm` needs it.
    """
    wasi = wasmtime.WasiConfig()
    origin_ns = time.monotonic_ns()
    wasi.argv = argv
    if plan.env:  # a new config has no environment: setting an empty one is a no-op
        wasi.env = list(plan.env.items())
    # Files, not stdout_custom: a Python callback per write costs ~70 us a run. The watchdog
    # stops a guest that writes far past the cap; the cap itself is applied when reading.
    wasi.stdout_file = workspace.stdout_path
    wasi.stderr_file = workspace.stderr_path
    # /task read-only (input.json), /task/output writable: nested preopens resolve by the
    # longest prefix, so the output dir is the only writable place.
    wasi.preopen_dir(workspace.task_dir, "/task", False)
    wasi.preopen_dir(workspace.output_dir, "/task/output", True)
    mounts = [(g, h, False) for g, h in plan.readonly_mounts.items()]
    mounts += [(g, h, True) for g, h in plan.writable_mounts.items()]
    mounts += [(g, h, False) for g, h in (extra_readonly or {}).items()]
    for guest, host, writable in mounts:
        try:
            wasi.preopen_dir(str(host), guest, writable)
        except wasmtime.WasmtimeError as exc:
            raise ConfigError(f"filesystem mount {guest} -> {host} cannot be opened") from exc
    return wasi, origin_ns


def call_start(store: wasmtime.Store, start: wasmtime.Func, plain: bool) -> None:
    """``start(store)``; for a `plain` ``() -> ()`` function without wasmtime-py's per-call
    type lookup and value conversion (the same C call, traps and errors raised alike)."""
    if not plain:
        start(store)
        return
    with enter_wasm(store) as trap:
        error = ffi.wasmtime_func_call(store._context(), ctypes.byref(start._func), _NO_VALS,
                                       0, _NO_VALS, 0, trap)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)


_NO_VALS = (ffi.wasmtime_val_t * 0)()


def record_exit(outcome: Outcome, exc: wasmtime.ExitTrap | wasmtime.Trap) -> None:
    """Put how the guest ended in `outcome`: its exit code (``proc_exit``, an `ExitTrap`),
    or the status and trap name of a wasm trap."""
    if isinstance(exc, wasmtime.ExitTrap):
        outcome.exit_code = exc.code
        outcome.status = Status.COMPLETED if exc.code == 0 else Status.FAILED
        return
    outcome.exit_code = None
    outcome.status, outcome.trap = classify_trap(exc)
    outcome.reason = first_line(exc.message)


def classify_trap(exc: wasmtime.Trap) -> tuple[Status, str]:
    """Status and trap name for a wasm trap."""
    code = exc.trap_code
    name = code.name.lower() if code is not None else "unknown"
    if code is wasmtime.TrapCode.OUT_OF_FUEL:
        return Status.OUT_OF_FUEL, name
    if code is wasmtime.TrapCode.INTERRUPT:
        return Status.TIMEOUT, name
    return Status.CRASHED, name


def settle(
    outcome: Outcome,
    plan: Plan,
    store: wasmtime.Store,
    watchdog: Watchdog,
    deadline: Deadline,
    monitor: Monitor,
    close: Callable[[wasmtime.Store], None] = close_store,
) -> None:
    """Finish an outcome: a watchdog stop wins over what the guest reported; fuel.

    Closes `store` (with `close`): whatever files the guest still holds (its captured stdio)
    are given back to the host before the sandbox reads them.
    """
    if watchdog.tripped is not None:
        outcome.reason = watchdog.tripped
        if deadline.expired:
            outcome.status = Status.TIMEOUT
        elif monitor.killed is not None:
            outcome.status = Status.ANOMALY
        else:
            outcome.status = Status.OUTPUT_REJECTED
        outcome.exit_code = None
    if deadline.expired:
        # How long the host thread was held after the deadline: a tick for wasm code, the
        # rest of the wait for a blocking call nothing could interrupt (see python.py).
        outcome.extra["held_past_deadline_s"] = time.monotonic() - deadline.at
    if plan.fuel is not None:
        outcome.fuel_consumed = plan.fuel - store.get_fuel()
    close(store)

