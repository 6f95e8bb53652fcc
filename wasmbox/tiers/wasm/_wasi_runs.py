"""Internal: the registry the shadowed WASI calls (`hostcalls`) find their run in.

The Linker is shared by every store of an engine, so each call finds its run by the store's
context address: `register` in `run.arm`, `unregister` before the store is closed.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import wasmtime
from wasmtime import _ffi as ffi

from wasmbox.lifecycle import Deadline

if TYPE_CHECKING:
    from wasmbox.tiers.wasm.engine import Watchdog
    from wasmbox.tiers.wasm.hostcalls import WasiCalls

WASI = "wasi_snapshot_preview1"
DEADLINE_REASON = "wall-clock deadline passed"

# WASI preview 1 errno values.
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_MFILE = 33
ERRNO_INVAL = 28
ERRNO_IO = 29


@dataclass
class RunHost:
    """What the shadowed calls need to know about one run."""

    deadline: Deadline
    watchdog: Watchdog
    # Where the guest's monotonic clock starts, on the host's (see `run.wasi_config`).
    monotonic_origin_ns: int
    wasi: WasiCalls
    open_files: int = 0
    open_files_peak: int = 0
    refused_opens: int = 0
    _real: dict[str, ffi.wasmtime_func_t] | None = None

    def real(
        self, caller: ctypes._Pointer[ffi.wasmtime_caller_t]
    ) -> dict[str, ffi.wasmtime_func_t]:
        """wasmtime's own WASI calls, callable with the guest's memory as theirs."""
        if self._real is None:
            self._real = self.wasi.trampoline(caller)
        return self._real


RUNS: dict[int, RunHost] = {}
_LOCK = threading.Lock()


def key(context: ctypes._Pointer[ffi.wasmtime_context_t]) -> int:
    """The registry key of a store's context: its address."""
    return ctypes.cast(context, ctypes.c_void_p).value or 0


def register(store: wasmtime.Store, run: RunHost) -> None:
    """Make `run` the one the shadowed calls of `store` answer to."""
    with _LOCK:
        RUNS[key(store._context())] = run


def unregister(store: wasmtime.Store) -> None:
    """Forget `store` (call before closing it: a context address may be reused)."""
    with _LOCK:
        RUNS.pop(key(store._context()), None)
