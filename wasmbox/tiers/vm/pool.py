"""Machines booted ahead of time, one shape at a time; each is handed out once, then destroyed.

The refill thread starts the machines, so QEMU's parent-death signal is tied to a thread that
lives as long as the pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from wasmbox.lifecycle import Closeable
from wasmbox.tiers.vm.machine import Machine, Shape


class Pool(Closeable):
    """Keeps `size` machines of the most recently requested shape booting or waiting."""

    def __init__(self, size: int, boot: Callable[[Shape], Machine], boot_timeout: float) -> None:
        self._size = size
        self._boot = boot
        self._boot_timeout = boot_timeout
        self._shape: Shape | None = None
        self._machines: list[Machine] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._refill, daemon=True,
                                        name="wasmbox-vm-pool")
        self._thread.start()

    def warm(self, shape: Shape) -> None:
        """Keep machines of `shape` from now on (machines of another shape are dropped)."""
        with self._changed:
            self._shape = shape
            self._changed.notify_all()

    def take(self, shape: Shape, wait: float) -> Machine | None:
        """A machine of `shape` that is ready within `wait` seconds, or None (boot one cold)."""
        with self._changed:
            self._shape = shape
            candidates = [m for m in self._machines if m.shape == shape]
            candidates.sort(key=lambda m: m.ready_at is None)  # ready ones first
            machine = candidates[0] if candidates else None
            if machine is not None:
                self._machines.remove(machine)
            self._changed.notify_all()
        if machine is None:
            return None
        if machine.wait_ready(min(wait, self._boot_timeout)) and machine.alive:
            return machine
        machine.close()
        return None

    def wait_ready(self, timeout: float) -> bool:
        """True once some pooled machine of the current shape printed its ready marker."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._changed:
                if any(m.ready_at is not None and m.shape == self._shape
                       for m in self._machines):
                    return True
            time.sleep(0.02)
        return False

    @property
    def idle(self) -> int:
        """Machines booting or waiting."""
        with self._changed:
            return len(self._machines)

    def _refill(self) -> None:
        while True:
            with self._changed:
                if self.closed:
                    return
                stale = [m for m in self._machines if m.shape != self._shape or
                         (m.process.poll() is not None)]
                self._machines = [m for m in self._machines if m not in stale]
                shape = self._shape
                wanted = shape is not None and len(self._machines) < self._size
                if not wanted and not stale:
                    self._changed.wait()
                    continue
            for machine in stale:
                machine.close()
            if wanted and shape is not None:
                try:
                    machine = self._boot(shape)
                except Exception:
                    with self._changed:
                        self._changed.wait(1.0)  # don't spin on a host that cannot boot
                    continue
                with self._changed:
                    if self.closed:
                        machine.close()
                        return
                    self._machines.append(machine)

    def _release(self) -> None:
        with self._changed:
            machines, self._machines = self._machines, []
            self._changed.notify_all()
        for machine in machines:
            machine.close()
        self._thread.join(timeout=5.0)
