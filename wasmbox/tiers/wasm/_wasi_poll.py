"""Internal: WASI ``poll_oneoff`` and the clock shim's ``remaining``, bounded by the run's
deadline (see `hostcalls` for why wasmtime's own cannot be used).
"""

from __future__ import annotations

import struct
import time

import wasmtime
from wasmtime import _ffi as ffi

from wasmbox.tiers.wasm._wasi_runs import (
    DEADLINE_REASON,
    ERRNO_FAULT,
    ERRNO_INVAL,
    ERRNO_IO,
    ERRNO_SUCCESS,
    RUNS,
    RunHost,
    key,
)

# WASI preview 1 clocks and the layout of subscriptions and events.
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


def poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int,
                nevents_ptr: int) -> int:
    """WASI ``poll_oneoff``, bounded by the run's deadline. Returns a WASI errno, never
    raises: wasmtime-py hands an escaping exception to whichever thread next sees a trap
    (a process-wide slot), which may be another run's."""
    try:
        return _poll_oneoff(caller, in_ptr, out_ptr, nsubs, nevents_ptr)
    except Exception:
        return ERRNO_IO


def _poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int,
                 nevents_ptr: int) -> int:
    run = RUNS.get(key(caller._context()))
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


_U64_MAX = (1 << 64) - 1


def remaining_ns(store: wasmtime.StoreContext) -> int:
    """Nanoseconds left before the calling store's deadline (the clock shim's ``remaining``).

    Once the deadline has passed, also stops the run as TIMEOUT (as `poll_oneoff` does).
    Never raises: an unknown store gets 0, so it can wait for nothing.
    """
    try:
        context = store._context()
        run = RUNS.get(key(context))
        if run is None:
            return 0
        left = run.deadline.remaining()
        if left is None:
            return _U64_MAX
        if left <= 0:
            run.watchdog.tripped = DEADLINE_REASON
            ffi.wasmtime_context_set_epoch_deadline(context, 0)
            return 0
        return min(_U64_MAX, int(left * 1e9))
    except Exception:
        return 0


def _sleep_until_due(run: RunHost, caller: wasmtime.Caller, wait_s: float) -> None:
    """Sleep `wait_s`, or until the deadline if that comes first; then stop the guest."""
    due = time.monotonic() + wait_s
    while True:
        left = due - time.monotonic()
        remaining = run.deadline.remaining()
        if remaining is not None and remaining < left:
            run.deadline.sleep(remaining)  # a cancel wakes it at once
            # The guest must not go on as if its clock fired: the watchdog's reason makes the
            # run TIMEOUT whatever the guest does next, and a zero epoch deadline stops it at
            # its very next function entry or loop.
            run.watchdog.tripped = DEADLINE_REASON
            ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)
            return
        if left <= 0:
            return
        run.deadline.sleep(min(left, _LONGEST_SLEEP))  # cut short by a cancel: loop again
