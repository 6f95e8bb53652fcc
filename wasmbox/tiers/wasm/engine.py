"""Engines per config flavour, the shared epoch ticker, and per-store epoch watchdogs.

One `Engine` (and its WASI `Linker`) exists per flavour: compiled code is tied to the flags,
so the flavour is also part of the module cache key. A `pooled` flavour (WASI module runs)
uses wasmtime's pooling instance allocator: each run's memory and tables come from slots
reserved once per engine and kept resident (zeroed on release) instead of being mapped,
faulted in and unmapped per run; `EngineHandle.slots` bounds the runs that hold slots.

A single ticker thread per engine advances the epoch; every running store asks to be called
back on each tick, and the callback (`Watchdog.on_tick`) decides whether the guest goes on:
it trips the wall-clock deadline and any in-run guard (an output flood) without touching other
stores. The ticker only ticks while some store has a watchdog armed: an idle process (a Dask
worker between tasks) spends no CPU on it.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

import wasmtime
from wasmtime import _ffi as ffi

from wasmbox._lazy import Lazy
from wasmbox.errors import ConfigError
from wasmbox.lifecycle import Closeable
from wasmbox.models import GiB, KiB, MiB
from wasmbox.tiers.wasm import hostcalls
from wasmbox.tiers.wasm.compile_worker import FEATURES_KEY, engine_config

WASMTIME_VERSION = version("wasmtime")
TICK_SECONDS = 0.005
MIN_STACK = 64 * KiB
# The guest's stack lives on the host thread's stack; wasmtime aborts the whole process when
# max_wasm_stack does not fit, so refuse larger values before an Engine is ever built.
MAX_STACK = 4 * MiB


@dataclass(frozen=True, slots=True)
class Flavour:
    """The engine flags a run needs. Equal flavours share an Engine and compiled code."""

    fuel: bool
    stack: int
    pooled: bool = False  # the pooling instance allocator (see the module docstring)

    @property
    def key(self) -> str:
        """A stable name for the flavour, part of every compiled-module cache key."""
        pool = "-pool1" if self.pooled else ""
        return (f"wasmtime{WASMTIME_VERSION}-fuel{int(self.fuel)}-epoch1-stack{self.stack}"
                f"{pool}-{FEATURES_KEY}")


class EngineHandle(Closeable):
    """An Engine, its WASI linker and its epoch ticker."""

    def __init__(self, flavour: Flavour) -> None:
        if not MIN_STACK <= flavour.stack <= MAX_STACK:
            raise ConfigError(
                f"limits.stack must be between {MIN_STACK} and {MAX_STACK} bytes, "
                f"got {flavour.stack}"
            )
        self.flavour = flavour
        config = engine_config(flavour.fuel, flavour.stack)
        # Runs holding pool slots now; None for an on-demand engine.
        self.slots: threading.BoundedSemaphore | None = None
        if flavour.pooled:
            use_pooling(config)
            self.slots = threading.BoundedSemaphore(POOL_RUNS)
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        hostcalls.define(self.linker)
        self.wasi_calls = hostcalls.WasiCalls(self.engine)
        self._ticker = _Ticker(self.engine)

    def ensure_ticking(self) -> None:
        """Start the epoch ticker, or wake it if parked; call after `Watchdog.attach`."""
        self._ticker.ensure_started()

    def _release(self) -> None:
        self._ticker.stop()
        self.wasi_calls.close()
        self.linker.close()
        self.engine.close()


# Concurrent runs per pooled engine (each reserves ~4 GiB of address space, untouched).
POOL_RUNS = 64
KEEP_RESIDENT = 1 * MiB
_POOL_TABLES = 4
_POOL_TABLE_ELEMENTS = 100_000  # the default policy's limits.table_elements


def use_pooling(config: wasmtime.Config, *, memory: int = 4 * GiB,
                keep_resident: int = KEEP_RESIDENT) -> None:
    """Switch `config` to the pooling allocator, sized for `POOL_RUNS` WASI module runs
    (`memory` bytes a memory slot, `keep_resident` bytes kept resident: the tier uses the
    defaults, `benchmarks/bench_wasm_phases.py` other sizes).

    A run holds one memory, the module's tables and two instances (the guest and the
    host-call trampoline). Slots are as large as anything the store limits could allow
    (a 4 GiB memory: wasm32's whole space), so the store limits stay the only caps; a
    module that still does not fit (more tables, larger tables or instance state than a
    slot) is refused when loaded, and the tier runs it on the on-demand engine instead.
    Memory and tables up to `KEEP_RESIDENT` bytes stay resident between runs, zeroed on
    release rather than decommitted (no page faults, no munmap and TLB shootdown per run).
    """
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, POOL_RUNS)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, POOL_RUNS * _POOL_TABLES)
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, POOL_RUNS * 2)
        ffi.wasmtime_pooling_allocation_config_max_tables_per_module_set(pool, _POOL_TABLES)
        ffi.wasmtime_pooling_allocation_config_table_elements_set(pool, _POOL_TABLE_ELEMENTS)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, memory)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
            pool, keep_resident)
        ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, keep_resident)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)


class _Ticker:
    """Advances the engine's epoch every `TICK_SECONDS` while any watchdog is armed.

    With none armed it parks on `_wake` (no CPU). `ensure_started` sets `_wake` after the
    caller's `Watchdog.attach`, and the loop clears `_wake` before it looks for watchdogs, so
    a watchdog armed while the loop decides to park still wakes it: a running guest never
    waits for a tick longer than one period. `ticks` counts increments (for tests).
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Lazy[threading.Thread] = Lazy(self._start)
        self.ticks = 0

    def ensure_started(self) -> None:
        self._thread.get()
        self._wake.set()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="wasmbox-epoch", daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not _WATCHDOGS:
                self._wake.wait()
                continue
            if self._stop.wait(TICK_SECONDS):
                return
            self._engine.increment_epoch()
            self.ticks += 1

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread.take()
        if thread is not None:
            thread.join()


# --- per-store watchdog, called by wasmtime on every epoch tick ----------------------------

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_CONTINUE = 0
_WATCHDOGS: dict[int, Watchdog] = {}
_IDS = itertools.count(1)


class Watchdog:
    """Decides on every tick whether a store's guest may go on.

    `check` returns None to continue or a reason to stop; the reason is kept in `tripped` so
    the runner can tell a watchdog stop from a guest trap.
    """

    def __init__(self, check: Callable[[], str | None]) -> None:
        self.check = check
        self.tripped: str | None = None

    def attach(self, store: wasmtime.Store) -> None:
        """Arm the watchdog on `store`; it is dropped when the store is deleted."""
        ident = next(_IDS)
        _WATCHDOGS[ident] = self
        ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), _ON_TICK, ident, _ON_DROP
        )
        store.set_epoch_deadline(1)


def _on_tick(
    _ctx: object, data: int | None, delta: ctypes._Pointer[ctypes.c_uint64],
    kind: ctypes._Pointer[ctypes.c_uint8],
) -> int:
    watchdog = _WATCHDOGS.get(data or 0)
    try:
        reason = "watchdog lost" if watchdog is None else watchdog.check()
    except Exception as exc:  # an exception cannot cross into wasmtime: stop the guest instead
        reason = f"watchdog failed: {exc!r}"
    if reason is None:
        delta[0] = 1
        kind[0] = _CONTINUE
        return 0
    if watchdog is not None:
        watchdog.tripped = reason
    error = ffi.wasmtime_error_new(f"wasmbox: {reason}".encode())
    return ctypes.cast(error, ctypes.c_void_p).value or 0


def _on_drop(data: int | None) -> None:
    _WATCHDOGS.pop(data or 0, None)


# Module-level references keep the C trampolines alive for as long as any store may call them.
_ON_TICK = _CALLBACK(_on_tick)
_ON_DROP = _FINALIZER(_on_drop)


def first_line(text: str) -> str:
    """The cause of a wasmtime error: the line after 'Caused by:', else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Caused by:" in lines and lines.index("Caused by:") + 1 < len(lines):
        return lines[lines.index("Caused by:") + 1].lstrip("0123456789: ")
    return lines[0] if lines else "unknown error"
