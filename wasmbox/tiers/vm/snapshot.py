"""Snapshots of a booted, waiting guest, and fresh guests restored from them.

A *template* guest of a shape boots with its RAM in a file (a shared mapping), prints READY
and blocks reading the entropy line that arms it. We migrate it then, with QEMU's
``x-ignore-shared`` capability: the saved state holds the devices only (hundreds of KB) and
the RAM file is the memory image. A restore starts a new QEMU with the same devices, maps the
RAM file private (copy on write: pages a guest never writes stay shared among its siblings)
and loads the state through an inherited fd (``-sandbox spawn=deny`` forbids ``exec:``).
A restore is two steps, `launch` (QEMU starts: 45-60 ms of its own under TCG here) and
`resume` (the state is loaded, the guest armed).
Every restored guest is a new process, armed with fresh entropy before a task can reach it,
and serves one task. The files live in the tier's run directory: removed on close, reclaimed
by the janitor when their owner died.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wasmbox.errors import HostFailure
from wasmbox.tiers.vm.machine import Machine, RamFile, Shape
from wasmbox.tiers.vm.qmp import Qmp
from wasmbox.workspace import remove_tree

_IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
_MONITOR_TIMEOUT = 10.0


class SnapshotError(HostFailure):
    """A template could not be saved, or a guest could not be restored from it."""


@dataclass(frozen=True)
class Snapshot:
    """A saved template guest: its RAM file and its device state."""

    directory: Path
    shape: Shape

    @property
    def ram(self) -> Path:
        """The template's memory image (mapped private by every restore)."""
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        """QEMU's device state, as ``migrate`` wrote it."""
        return self.directory / "state"

    def discard(self) -> None:
        """Delete the files (guests restored from them keep their private mappings)."""
        remove_tree(self.directory)


def take_snapshot(directory: Path, shape: Shape, start: Callable[[Path, RamFile], Machine],
                  timeout: float) -> Snapshot:
    """Boot a template with `start(machine_dir, ram)`, save it once it is READY, stop it.

    Raises `SnapshotError` (the directory is gone again) when any step fails.
    """
    snapshot = Snapshot(directory, shape)
    directory.mkdir(mode=0o700)
    try:
        # A short name: the sockets inside must fit AF_UNIX's 108 bytes.
        template = start(directory / "t", RamFile(snapshot.ram, shared=True))
        try:
            if not template.wait_booted(timeout):
                raise SnapshotError("the template guest did not boot: "
                                    f"{(template.qemu_errors() or template.serial_tail())[-300:]}")
            _save(template, snapshot.state)
        finally:
            template.close()
    except BaseException as exc:
        snapshot.discard()
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot save the template guest: {exc}") from exc
        raise
    return snapshot


def launch(snapshot: Snapshot, start: Callable[[RamFile, int], Machine]) -> Machine:
    """A new QEMU for a guest of `snapshot`, started with `start(ram, state_fd)`: it maps
    the RAM file and waits for `resume`.

    Raises `SnapshotError` when the snapshot cannot be opened.
    """
    try:
        fd = os.open(snapshot.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open the snapshot: {exc}") from exc
    try:
        return start(RamFile(snapshot.ram, shared=False), fd)
    finally:
        os.close(fd)  # QEMU holds its own copy


def resume(machine: Machine, timeout: float) -> Machine:
    """`machine` (from `launch`) with the state loaded, running, armed and ready.

    Raises `SnapshotError` or `QmpError` (the guest is gone again) when QEMU refuses the
    state or the guest does not arm within `timeout`.
    """
    end = time.monotonic() + timeout
    try:
        monitor = Qmp(machine.monitor_path, min(_MONITOR_TIMEOUT, timeout))
        try:
            # One round trip for both; then QEMU loads and starts the guest on its own.
            monitor.execute_all([("migrate-set-capabilities", {"capabilities": _IGNORE_SHARED}),
                                 ("migrate-incoming", {"uri": f"fd:{machine.incoming_fd}"})])
            # Nothing may reach the guest's devices before its state is loaded and running:
            # QEMU says RESUME when it starts the loaded guest (a failed load ends QEMU).
            monitor.wait_event("RESUME", max(0.0, end - time.monotonic()))
        finally:
            monitor.close()
        machine.arm()
        if not machine.wait_ready(max(0.0, end - time.monotonic())):
            reason = machine.qemu_errors() or machine.serial_tail() or "no reason given"
            raise SnapshotError(f"the restored guest never armed: {reason[-300:]}")
    except BaseException:
        machine.close()
        raise
    return machine


def _save(template: Machine, state: Path) -> None:
    monitor = Qmp(template.monitor_path, _MONITOR_TIMEOUT)
    try:
        monitor.execute("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            monitor.execute("getfd", fds=(fd,), fdname="snapshot")
        finally:
            os.close(fd)
        # Not stopped first: a guest saved running is resumed running by its restores.
        monitor.execute("migrate", uri="fd:snapshot")
        end = time.monotonic() + _MONITOR_TIMEOUT
        while True:
            status = (monitor.execute("query-migrate") or {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() >= end:
                raise SnapshotError(f"saving the template guest ended {status or 'nowhere'}")
            time.sleep(0.005)
    finally:
        monitor.close()
