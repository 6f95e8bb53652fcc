"""Internal: guests that served their task, stopped and removed off the task's critical path.

Killing QEMU and tearing down its memory and files takes ~10-20 ms here; a task whose result
no longer depends on its guest returns first and leaves that to the reaper's thread.
`close()` stops the thread and closes whatever is still queued, so nothing outlives the tier;
a reaper that is closed closes a machine on the caller's thread instead.
"""

from __future__ import annotations

import logging
import threading

from wasmbox.lifecycle import Closeable
from wasmbox.tiers.vm.machine import Machine

_log = logging.getLogger(__name__)


class Reaper(Closeable):
    """A thread that closes the machines handed to `reap`, oldest first."""

    def __init__(self) -> None:
        self._queue: list[Machine] = []
        self._busy = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="wasmbox-vm-reaper",
                                        daemon=True)
        self._thread.start()

    def reap(self, machine: Machine) -> None:
        """Close `machine` soon (at once, here, when the reaper is closed)."""
        with self._changed:
            if not self.closed:
                self._queue.append(machine)
                self._changed.notify_all()
                return
        machine.close()

    def wait_idle(self, timeout: float) -> bool:
        """True once every machine handed over so far is closed (for tests and benches)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self.closed)
                if not self._queue:
                    return
                machine = self._queue.pop(0)
                self._busy += 1
            try:
                machine.close()
            except Exception:
                _log.exception("vm: could not remove a finished guest")
            finally:
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()

    def _release(self) -> None:
        with self._changed:
            self._changed.notify_all()
        self._thread.join()
        with self._changed:
            left, self._queue = self._queue, []
        for machine in left:
            machine.close()
