"""One lifecycle for every handle wasmbox owns, and the deadline that bounds a run."""

from __future__ import annotations

import importlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Self

from wasmbox.errors import SandboxClosed


class Closeable:
    """Base of every resource owner: `close()` is idempotent, `with` closes, use-after-close raises.

    Subclasses implement `_release()`; it runs at most once, even when `close()` races.
    """

    _closed: bool = False

    def close(self) -> None:
        """Release everything this object holds. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        """Free the resources; called once by `close()`."""

    @property
    def closed(self) -> bool:
        """True once `close()` has been called."""
        return self._closed

    def _ensure_open(self) -> None:
        if self._closed:
            raise SandboxClosed(f"{type(self).__name__} is closed")

    def __enter__(self) -> Self:
        self._ensure_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with shielded():
            self.close()


class Deadline:
    """An absolute point on the monotonic clock; every wait of a run is bounded by it.

    `cancel` moves the point to now: every tier that honours the deadline stops the guest as
    it would on a timeout, and `cancelled` tells the two apart.
    """

    __slots__ = ("_woken", "at", "cancelled")

    def __init__(self, seconds: float | None) -> None:
        self.at = math.inf if seconds is None else time.monotonic() + seconds
        self.cancelled = False
        self._woken = threading.Event()

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None when the deadline is unbounded."""
        if self.at == math.inf:
            return None
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the deadline has passed (or the run was cancelled)."""
        return time.monotonic() >= self.at

    def cancel(self) -> None:
        """End the run now: the deadline passes at once and sleepers wake."""
        self.cancelled = True
        self.at = min(self.at, time.monotonic())
        self._woken.set()

    def restart(self, seconds: float | None) -> None:
        """Start the clock again with `seconds` from now (a tier whose guest needed a boot
        first: the boot has its own bound, the run gets its whole timeout); no-op once
        cancelled."""
        if not self.cancelled:
            self.at = math.inf if seconds is None else time.monotonic() + seconds

    def sleep(self, seconds: float) -> bool:
        """Wait up to `seconds`, never past the deadline; True when cut short by `cancel`."""
        left = self.remaining()
        return self._woken.wait(seconds if left is None else min(seconds, left))


def process_alive(pid: int) -> bool:
    """Whether a process exists (reclaiming what dead owners left relies on it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, just not ours
        return True
    return True


@contextmanager
def shielded() -> Iterator[None]:
    """Defer SIGINT while cleanup runs, so Ctrl-C cannot leave a sandbox half torn down.

    Only the main thread can hold signals back; elsewhere this is a no-op (the signal is
    delivered to the main thread anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    try:
        previous = _set_handler(signal.SIGINT, defer)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        _set_handler(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


# `signal.signal` (and `getsignal`) turn the handler into a `Handlers` enum when they can,
# which for a function raises and catches a ValueError inside the enum machinery: ~4 µs a
# call, ~45 µs a run once caches are cold. `_signal` is the C module under `signal`: the
# same call, the previous handler returned as it was stored (a function, or SIG_DFL/SIG_IGN
# as ints, which it takes back as they are).
_set_handler: Callable[[int, Any], Any] = importlib.import_module("_signal").signal
