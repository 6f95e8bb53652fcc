"""The wasm tier: a WASI command module run in-process by wasmtime, one fresh Store per run."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._extern import wrap_extern

from wasmbox._config import HostConfig
from wasmbox._lazy import Lazy, LazyMap
from wasmbox.errors import HostFailure, TierUnavailable
from wasmbox.lifecycle import Closeable, Deadline
from wasmbox.models import MiB, Status, TaskKind, TierName
from wasmbox.monitor import Monitor
from wasmbox.packages import wasm_refusal
from wasmbox.policy import Plan
from wasmbox.tiers.base import Availability, Outcome, TierCapabilities, check_capabilities
from wasmbox.tiers.wasm.cache import ModuleCache, NotPoolable, check_imports
from wasmbox.tiers.wasm.cache import Prepared as LoadedModule
from wasmbox.tiers.wasm.engine import (
    POOL_RUNS,
    WASMTIME_VERSION,
    EngineHandle,
    Flavour,
    Watchdog,
    first_line,
)
from wasmbox.tiers.wasm.run import (
    arm,
    call_start,
    close_store,
    record_exit,
    settle,
    wasi_config,
)
from wasmbox.tiers.wasm.source_scan import imported_modules
from wasmbox.workspace import Workspace

if TYPE_CHECKING:
    from wasmbox.tiers.wasm.python import PythonReady, PythonRuntime

WASM_PAGE = 65536
_NO_CACHE = Path("/nonexistent")


@dataclass(frozen=True)
class WasmPrepared:
    """A plan ready to run: its engine, and the pre-linked module or the Python interpreter."""

    plan: Plan
    handle: EngineHandle
    cache: ModuleCache | None = None
    module: LoadedModule | None = None
    pre: wasmtime.InstancePre | None = None
    python: PythonReady | None = None


class WasmTier(Closeable):
    """Runs WASI modules under fuel, an epoch deadline, store limits and two preopens."""

    name = TierName.WASM
    capabilities = TierCapabilities(kinds=frozenset({TaskKind.WASM, TaskKind.PYTHON}))

    def __init__(self, cache_dir: Path | None = _NO_CACHE, *,
                 config: HostConfig | None = None) -> None:
        """`cache_dir` None keeps compiled code in memory only; default: the config's."""
        if cache_dir is _NO_CACHE:
            cache_dir = (config or HostConfig.from_env()).module_cache
        self._cache_dir = cache_dir
        self._engines: LazyMap[Flavour, tuple[EngineHandle, ModuleCache]] = LazyMap()
        self._python: Lazy[PythonRuntime] = Lazy(self._make_python_runtime)

    def availability(self) -> Availability:
        """The wasm tier runs wherever the wasmtime wheel loads."""
        try:
            wasmtime.Engine().close()
        except Exception as exc:
            return Availability(self.name, False, f"wasmtime cannot start: {exc}")
        return Availability(
            self.name, True, "in-process wasmtime", {"wasmtime": WASMTIME_VERSION}
        )

    def prepare(self, plan: Plan) -> WasmPrepared:
        """Check, validate, compile (or load from cache) and pre-link the plan's code, once.

        Raises `TierDeclined` for a plan WASI cannot serve (network, capabilities, hidden
        paths), `ModuleRejected`/`PolicyViolation` for a bad module.
        """
        check_capabilities(self.name, self.capabilities, plan)
        self._ensure_open()
        fuel = plan.fuel is not None
        if plan.task.kind is TaskKind.PYTHON:
            flavour = Flavour(fuel=fuel, stack=plan.stack)
            refused = _package_refusal(plan)  # an imported package with C extensions
            if refused is not None:
                raise TierUnavailable(str(self.name), refused)
            runtime = self._python_runtime()
            available = runtime.availability()
            if not available.ok:
                raise TierUnavailable(str(self.name), available.reason)
            ready = runtime.ready(plan, flavour)
            return WasmPrepared(plan, ready.interp.handle, python=ready)
        try:
            return self._prepare_module(plan, Flavour(fuel=fuel, stack=plan.stack, pooled=True))
        except NotPoolable:  # tables or instance state larger than a pool slot
            return self._prepare_module(plan, Flavour(fuel=fuel, stack=plan.stack))

    def _prepare_module(self, plan: Plan, flavour: Flavour) -> WasmPrepared:
        handle, cache = self._engine_for(flavour)
        task = plan.task
        if task.module is not None:
            module = cache.load_path(task.module, task.sha256, plan.timeout)
        else:
            assert task.module_bytes is not None  # guaranteed by Task validation
            module = cache.load_bytes(task.module_bytes, task.sha256, plan.timeout)
        pre = check_imports(module, plan.allowed_imports)
        return WasmPrepared(plan, handle, cache=cache, module=module, pre=pre)

    def unsuitable(self, prepared: WasmPrepared) -> str | None:
        """Why this tier should not take the plan under ``tier="auto"``, or None: Python
        source importing a module the wasm interpreter lacks belongs in a heavier tier."""
        if prepared.python is None:
            return None
        return self._python_runtime().unsuitable(prepared.plan)

    def run(
        self, prepared: WasmPrepared, workspace: Workspace, deadline: Deadline, monitor: Monitor
    ) -> Outcome:
        """Run the module's ``_start`` in a fresh Store; the Store is gone when this returns."""
        self._ensure_open()  # the engines must still be there
        plan = prepared.plan
        if prepared.python is not None:
            return self._python_runtime().run(plan, workspace, deadline, monitor,
                                              prepared.python)
        t0 = time.perf_counter()
        assert prepared.module is not None and prepared.pre is not None and prepared.cache
        slots = prepared.handle.slots
        if slots is not None and not _take_slot(slots, deadline):
            return Outcome(status=Status.TIMEOUT, exit_code=None,
                           reason=f"no wasm instance slot came free before the deadline "
                                  f"({POOL_RUNS} runs at once per engine)")
        try:
            store = wasmtime.Store(prepared.handle.engine)
            try:
                outcome = _execute(plan, workspace, deadline, monitor, prepared.handle,
                                   prepared.module, prepared.pre, store, t0)
            finally:
                close_store(store)
        finally:
            if slots is not None:
                slots.release()  # the store, and with it every slot it held, is gone
        # Compiling happened in `prepare`, before the deadline: reported by the first run.
        outcome.extra["compile_s"] = prepared.cache.claim_compile_s(prepared.module.sha256)
        return outcome

    def _python_runtime(self) -> PythonRuntime:
        return self._python.get()

    def _make_python_runtime(self) -> PythonRuntime:
        self._ensure_open()
        from wasmbox.tiers.wasm.python import PythonRuntime

        return PythonRuntime(self._cache_dir, lambda flavour: self._engine_for(flavour)[0])

    def _engine_for(self, flavour: Flavour) -> tuple[EngineHandle, ModuleCache]:
        def make() -> tuple[EngineHandle, ModuleCache]:
            self._ensure_open()
            handle = EngineHandle(flavour)
            return handle, ModuleCache(handle, self._cache_dir)

        return self._engines.get(flavour, make)

    def _release(self) -> None:
        runtime = self._python.take()
        if runtime is not None:
            runtime.close()
        for handle, cache in self._engines.take_all():
            cache.clear()
            handle.close()


def _take_slot(slots: threading.BoundedSemaphore, deadline: Deadline) -> bool:
    """One of a pooled engine's run slots; False if the deadline passes (or the run is
    cancelled) first. Waits in short steps so a cancel is seen while waiting."""
    while True:
        left = deadline.remaining()
        if slots.acquire(timeout=_SLOT_WAIT if left is None else min(_SLOT_WAIT, left)):
            return True
        if deadline.expired:
            return False


_SLOT_WAIT = 0.05


def _execute(
    plan: Plan,
    workspace: Workspace,
    deadline: Deadline,
    monitor: Monitor,
    handle: EngineHandle,
    prepared: LoadedModule,
    pre: wasmtime.InstancePre,
    store: wasmtime.Store,
    t0: float,
) -> Outcome:
    name = plan.task.module.name if plan.task.module is not None else "task.wasm"
    wasi, clock_origin = wasi_config(plan, workspace, [name, *plan.args])
    store.set_wasi(wasi)
    watchdog, watch = arm(store, plan, workspace, deadline, monitor, handle, clock_origin)

    outcome = Outcome(status=Status.COMPLETED, exit_code=0)
    instance = None
    try:
        instance = pre.instantiate(store)
        watch.memories = _memories(
            _export(store, instance, name) for name in prepared.memory_exports
        )
        start = _export(store, instance, "_start")
        assert isinstance(start, wasmtime.Func)  # the cache admits only a function _start
        t1 = time.perf_counter()
        cpu0 = time.thread_time()
        try:
            call_start(store, start, prepared.plain_start)
        finally:
            outcome.run_s = time.perf_counter() - t1
            outcome.cpu_s = time.thread_time() - cpu0
            outcome.startup_s = t1 - t0
    except (wasmtime.ExitTrap, wasmtime.Trap) as exc:
        record_exit(outcome, exc)
    except wasmtime.WasmtimeError as exc:
        outcome.exit_code = None
        outcome.status, outcome.reason = _classify_error(exc, watchdog, instance is None, plan)

    outcome.peak_memory_bytes = watch.memory_bytes()  # memories never shrink: the end is the peak
    if outcome.status in (Status.FAILED, Status.CRASHED) and _at_memory_cap(outcome, plan):
        outcome.status = Status.MEMORY_EXCEEDED
        outcome.reason = (
            f"linear memory reached {outcome.peak_memory_bytes} of its {plan.memory} byte cap"
        )
    settle(outcome, plan, store, watchdog, deadline, monitor)
    return outcome


def _export(
    store: wasmtime.Store, instance: wasmtime.Instance, name: str
) -> wasmtime.AsExtern | None:
    """One export by name, without wrapping every other export as `Instance.exports` does."""
    item = ffi.wasmtime_extern_t()
    raw = name.encode()
    if not ffi.wasmtime_instance_export_get(
        store._context(), ctypes.byref(instance._instance), raw, len(raw), ctypes.byref(item)
    ):
        return None
    return wrap_extern(item)


def _memories(exports: Iterable[wasmtime.AsExtern | None]) -> list[wasmtime.Memory]:
    # Each memory once, however many names export it: identity is the raw handle's fields
    # (store id and the two private indices; the struct's padding bytes are not stable).
    found: dict[tuple[int, int, int], wasmtime.Memory] = {}
    items = list(exports)
    if len(items) == 1:  # the usual single export: nothing to tell apart
        return [item for item in items if isinstance(item, wasmtime.Memory)]
    for item in items:
        if isinstance(item, wasmtime.Memory):
            raw = item._memory
            key = (raw._anon_1.store_id, getattr(raw._anon_1, "__private1"),
                   getattr(raw, "__private2"))
            found.setdefault(key, item)
    return list(found.values())


def _classify_error(
    exc: wasmtime.WasmtimeError, watchdog: Watchdog, instantiating: bool, plan: Plan
) -> tuple[Status, str]:
    message = first_line(str(exc))
    if watchdog.tripped is not None:
        return Status.TIMEOUT, watchdog.tripped
    if "invalid exit status" in message:
        # WASI proc_exit outside [0, 126) is refused by wasmtime rather than reported.
        return Status.FAILED, message
    if instantiating:
        if "memory" in message or "limit" in message:
            return Status.MEMORY_EXCEEDED, f"instantiation needs more than {plan.memory} bytes"
        raise HostFailure(f"instantiation failed: {message}") from exc
    return Status.CRASHED, message


def _at_memory_cap(outcome: Outcome, plan: Plan) -> bool:
    # wasmtime refuses memory.grow past the store limit without a trap (and wasmtime-py has no
    # limiter callback to observe it); the guest sees malloc fail and dies its own way. A
    # failed run whose memory got within one allocator step (a page, up to 4 MiB) of the cap
    # is the cap's doing.
    peak = outcome.peak_memory_bytes
    margin = max(WASM_PAGE, min(4 * MiB, plan.memory // 8))
    return peak is not None and peak + margin > plan.memory


def _package_refusal(plan: Plan) -> str | None:
    """Why the plan's Python source cannot run here because of a package it imports (one
    with C extensions), or None; `ConfigError` for an unsafe package entry."""
    packages = plan.policy.python.packages
    if not packages:
        return None
    return wasm_refusal(packages, imported_modules(plan.task.source or ""))
