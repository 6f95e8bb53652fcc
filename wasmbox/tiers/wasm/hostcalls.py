"""Host-side WASI calls that must answer to the run's limits, shadowing wasmtime's own.

wasmtime's WASI ``poll_oneoff`` blocks the host thread inside a host call, where no epoch
check can reach it: a guest calling ``sleep(6)`` held its thread 6 s past a 1 s deadline.
Our `poll_oneoff` replaces it in the engine's (shared, pre-linked) Linker. It reads the
subscriptions from guest memory, waits for the earliest clock but never past the run's
deadline, and writes the events back in the WASI preview 1 layout. A wait cut short by the
deadline trips the run's watchdog, so the run ends TIMEOUT (clock waits are wall time).

The Linker is shared by every store of an engine, so each call finds its run in a registry
keyed by the store's context address: `register` in `arm`, `unregister` before the store
is closed.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import wasmtime
from wasmtime import _ffi as ffi

from wasmbox.lifecycle import Deadline

if TYPE_CHECKING:
    from wasmbox.tiers.wasm.engine import Watchdog

WASI = "wasi_snapshot_preview1"
DEADLINE_REASON = "wall-clock deadline passed"

# WASI preview 1 errno values and layout.
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
EVENTTYPE_CLOCK = 0
EVENTTYPE_FD_READ = 1
EVENTTYPE_FD_WRITE = 2
SUBCLOCKFLAGS_ABSTIME = 1
SUBSCRIPTION_SIZE = 48
EVENT_SIZE = 32
# subscription: userdata, tag, then (clock) id, timeout, precision, flags; an fd
# subscription's fd sits where the clock id does and is not needed.
_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
_LONGEST_SLEEP = 3600.0  # one host sleep; longer waits (no deadline) loop


@dataclass
class RunHost:
    """What the shadowed calls need to know about one run."""

    deadline: Deadline
    watchdog: Watchdog
    # Where the guest's monotonic clock starts, on the host's (see `run.wasi_config`).
    monotonic_origin_ns: int


_RUNS: dict[int, RunHost] = {}
_LOCK = threading.Lock()


def _key(context: ctypes._Pointer[ffi.wasmtime_context_t]) -> int:
    return ctypes.cast(context, ctypes.c_void_p).value or 0


def register(store: wasmtime.Store, run: RunHost) -> None:
    """Make `run` the one the shadowed calls of `store` answer to."""
    with _LOCK:
        _RUNS[_key(store._context())] = run


def unregister(store: wasmtime.Store) -> None:
    """Forget `store` (call before closing it: a context address may be reused)."""
    with _LOCK:
        _RUNS.pop(_key(store._context()), None)


def define(linker: wasmtime.Linker) -> None:
    """Shadow wasmtime's WASI calls in `linker` (which already has ``define_wasi``)."""
    i32 = wasmtime.ValType.i32()
    linker.allow_shadowing = True
    linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]),
                       poll_oneoff, access_caller=True)
    linker.allow_shadowing = False


def poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int,
                nevents_ptr: int) -> int:
    """WASI ``poll_oneoff``, bounded by the run's deadline. Returns a WASI errno."""
    run = _RUNS.get(_key(caller._context()))
    memory = caller.get("memory")
    if run is None or not isinstance(memory, wasmtime.Memory):
        return ERRNO_FAULT
    # wasmtime hands i32s over signed; the guest means unsigned addresses and counts.
    in_ptr, out_ptr, nsubs, nevents_ptr = (v & 0xFFFFFFFF for v in
                                           (in_ptr, out_ptr, nsubs, nevents_ptr))
    if nsubs == 0:
        return ERRNO_INVAL
    size = memory.data_len(caller)
    if (in_ptr + nsubs * SUBSCRIPTION_SIZE > size or out_ptr + nsubs * EVENT_SIZE > size
            or nevents_ptr + 4 > size):
        return ERRNO_FAULT
    if in_ptr % 8 or out_ptr % 8 or nevents_ptr % 4:
        return ERRNO_INVAL
    raw = memory.read(caller, in_ptr, in_ptr + nsubs * SUBSCRIPTION_SIZE)

    ready: list[bytes] = []  # events due now
    clocks: list[tuple[float, int]] = []  # (seconds to wait, userdata) of pending clocks
    for offset in range(0, len(raw), SUBSCRIPTION_SIZE):
        userdata, tag, clock_id, timeout, _precision, flags = _SUBSCRIPTION.unpack_from(
            raw, offset)
        if tag in (EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE):
            # The guest's fds are regular files and pipes to files: always ready.
            ready.append(_EVENT.pack(userdata, ERRNO_SUCCESS, tag, 0, 0))
            continue
        if tag != EVENTTYPE_CLOCK:
            return ERRNO_INVAL
        wait = _wait_ns(run, clock_id, timeout, flags)
        if wait is None:
            return ERRNO_INVAL
        if wait <= 0:
            ready.append(_EVENT.pack(userdata, ERRNO_SUCCESS, EVENTTYPE_CLOCK, 0, 0))
        else:
            clocks.append((wait / 1e9, userdata))

    if not ready:
        wait_s, userdata = min(clocks)
        _sleep_until_due(run, caller, wait_s)
        ready.append(_EVENT.pack(userdata, ERRNO_SUCCESS, EVENTTYPE_CLOCK, 0, 0))
    memory.write(caller, b"".join(ready), out_ptr)
    memory.write(caller, struct.pack("<I", len(ready)), nevents_ptr)
    return ERRNO_SUCCESS


def _wait_ns(run: RunHost, clock_id: int, timeout: int, flags: int) -> int | None:
    """Nanoseconds until a clock subscription fires, or None for a clock we do not offer."""
    if not flags & SUBCLOCKFLAGS_ABSTIME:
        return timeout if clock_id in (CLOCK_REALTIME, CLOCK_MONOTONIC) else None
    if clock_id == CLOCK_REALTIME:
        return timeout - time.time_ns()
    if clock_id == CLOCK_MONOTONIC:
        return timeout - (time.monotonic_ns() - run.monotonic_origin_ns)
    return None


def _sleep_until_due(run: RunHost, caller: wasmtime.Caller, wait_s: float) -> None:
    """Sleep `wait_s`, or until the deadline if that comes first; then stop the guest."""
    due = time.monotonic() + wait_s
    while True:
        left = due - time.monotonic()
        remaining = run.deadline.remaining()
        if remaining is not None and remaining < left:
            time.sleep(remaining)
            # The guest must not go on as if its clock fired: the watchdog's reason makes the
            # run TIMEOUT whatever the guest does next, and a zero epoch deadline stops it at
            # its very next function entry or loop.
            run.watchdog.tripped = DEADLINE_REASON
            ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)
            return
        if left <= 0:
            return
        time.sleep(min(left, _LONGEST_SLEEP))
