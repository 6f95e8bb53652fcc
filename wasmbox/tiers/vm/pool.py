"""Machines booted ahead of time: the VM tier's use of `wasmbox.pool.Pool`.

The pool's refill thread starts the machines, so QEMU's parent-death signal is tied to a
thread that lives as long as the pool. A pooled machine may still be booting when a task
takes it: the task then waits for its ready marker, which beats booting a second guest on
the same cores. Each machine serves one task and is destroyed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from wasmbox.models import TierName
from wasmbox.pool import Pool
from wasmbox.tiers.vm.machine import Machine, Shape


class MachinePool(Pool[Shape, Machine]):
    """Keeps `size` machines of the most recently requested shape booting or waiting."""

    def __init__(self, size: int, boot: Callable[[Shape], Machine]) -> None:
        super().__init__(TierName.VM.value, size, boot, Machine.close, usable=_alive)

    def take_ready(self, shape: Shape, wait: float, refill_wait: float = 0.0) -> Machine | None:
        """A machine of `shape` that is ready within `wait` seconds, or None (boot one cold).

        With `refill_wait`, an empty pool is given that long to finish the machine it is
        making (a restore takes a fraction of a cold boot, so waiting for it wins).
        """
        end = time.monotonic() + refill_wait
        self.warm(shape)
        while self.idle == 0 and not self.closed and time.monotonic() < end:
            time.sleep(0.003)
        machine = self.take(shape)
        if machine is None:
            return None
        if machine.wait_ready(wait, starved_grace=True) and machine.alive:
            return machine
        machine.close()
        return None

    def wait_ready(self, timeout: float) -> bool:
        """True once the pool is full and its oldest machine printed its ready marker."""
        end = time.monotonic() + timeout
        if not self.wait_filled(timeout):
            return False
        machines = self.idle_items()
        return bool(machines) and machines[0].wait_ready(max(0.0, end - time.monotonic()))


def _alive(machine: Machine) -> bool:
    return machine.alive
