"""Internal: where a VM tier's machines come from: restored from a snapshot, or booted.

`MachineSupply` holds the tier's machine-making half (the pool's refill callback, the
per-shape templates and why a shape has none); `VmTier` adds preparing and running tasks.
"""

from __future__ import annotations

import threading
from pathlib import Path

from wasmbox.errors import HostFailure, SandboxClosed
from wasmbox.lifecycle import Closeable
from wasmbox.tiers.vm.assets import PREPARE_COMMAND, Assets
from wasmbox.tiers.vm.machine import Machine, RamFile, Shape
from wasmbox.tiers.vm.reaper import Reaper
from wasmbox.tiers.vm.snapshot import Snapshot, launch, resume, take_snapshot

RESTORE_TIMEOUT = 10.0  # a TCG restore takes ~0.2 s here; far past that it has failed
REFILL_WAIT = 2.0  # how long a task awaits a restore in progress rather than booting cold
MAX_SNAPSHOTS = 2  # shapes with a saved template (each holds up to its guest RAM in a file)


class MachineSupply(Closeable):
    """Machines for one tier: restores from per-shape snapshots, boots when there is none."""

    _use_snapshots: bool
    _snapshot_lock: threading.Lock
    _snapshots: dict[Shape, Snapshot]
    _snapshot_failures: dict[Shape, str]
    _booted_first: set[Shape]
    _boot_timeout: float
    _extra_cmdline: str
    _lock: threading.Lock
    _assets: Assets | None
    _run_dir: Path | None
    _kvm: bool | None
    _counter: int
    _reaper: Reaper | None

    @property
    def snapshots(self) -> dict[Shape, Snapshot]:
        """The saved templates, by shape (a copy)."""
        with self._snapshot_lock:
            return dict(self._snapshots)

    @property
    def snapshot_failures(self) -> dict[Shape, str]:
        """Why a shape's pool boots instead of restoring, by shape (a copy)."""
        with self._snapshot_lock:
            return dict(self._snapshot_failures)

    def _dispose(self, machine: Machine) -> None:
        """Stop and remove a machine whose task is done, off the task's critical path."""
        reaper = self._reaper
        if reaper is None:
            machine.close()
        else:
            reaper.reap(machine)

    def _refill_wait(self, shape: Shape) -> float:
        """How long a task awaits the pool's next machine rather than booting its own: a
        restore takes a fraction of a cold boot, so it is worth awaiting."""
        with self._snapshot_lock:
            return REFILL_WAIT if shape in self._snapshots else 0.0

    def _pooled_machine(self, shape: Shape) -> Machine:
        """A machine for the pool (the refill thread): restored when the shape has a
        snapshot, else booted; a failed restore is recorded and never fails the pool."""
        snapshot = self._snapshot_for(shape)
        if snapshot is not None:
            try:
                return resume(launch(snapshot, lambda ram, fd: self._start(
                    shape, ram=ram, incoming_fd=fd)), min(RESTORE_TIMEOUT, self._boot_timeout))
            except HostFailure as exc:
                if self.closed:
                    raise
                self._drop_snapshot(shape, f"restore failed: {exc}")
        return self._boot_machine(shape, arm=True)

    def _snapshot_for(self, shape: Shape) -> Snapshot | None:
        assets, run_dir = self._assets, self._run_dir
        assert assets is not None and run_dir is not None
        with self._snapshot_lock:
            if not self._use_snapshots or shape in self._snapshot_failures:
                return None
            if shape in self._snapshots:
                return self._snapshots[shape]
            reason = self._snapshot_note(assets, shape)
            if reason != "on":
                self._snapshot_failures[shape] = reason
                return None
            if shape not in self._booted_first:
                # The shape's first machine boots, so a task can have it as soon as before;
                # the template follows, while that task runs.
                self._booted_first.add(shape)
                return None
        with self._lock:
            self._counter += 1
            directory = run_dir / f"s{self._counter}"
        try:
            snapshot = take_snapshot(
                directory, shape, lambda d, ram: self._start(shape, directory=d, ram=ram,
                                                             monitor=True),
                self._boot_timeout)
        except HostFailure as exc:
            with self._snapshot_lock:
                self._snapshot_failures[shape] = f"no snapshot: {exc}"
            return None
        with self._snapshot_lock:
            if self.closed:
                evicted = [snapshot]
            else:
                self._snapshots[shape] = snapshot
                evicted = [self._snapshots.pop(s) for s in list(self._snapshots)
                           [:-MAX_SNAPSHOTS]]
        for old in evicted:
            old.discard()
        return None if self.closed else snapshot

    def _drop_snapshot(self, shape: Shape, reason: str) -> None:
        with self._snapshot_lock:
            snapshot = self._snapshots.pop(shape, None)
            self._snapshot_failures[shape] = reason
        if snapshot is not None:
            snapshot.discard()

    def _snapshot_note(self, assets: Assets, shape: Shape | None = None) -> str:
        """"on", or why guests of `shape` (any shape, when None) are not restored."""
        if not self._use_snapshots:
            return "off (disabled for this tier)"
        if not assets.seed_helper:
            return ("off: the initramfs has no entropy helper (no C compiler when the assets "
                    f"were built); install one and run `{PREPARE_COMMAND}`")
        if shape is not None and shape.python:
            # The pre-started interpreter's hash seed and `random` state would be shared by
            # every guest restored from one template.
            return "off for Python shapes: a pre-started interpreter's seeds would be shared"
        return "on"

    def _boot_machine(self, shape: Shape, initrd: Path | None = None, *,
                      arm: bool = False) -> Machine:
        return self._start(shape, initrd=initrd, arm=arm)

    def _start(self, shape: Shape, *, directory: Path | None = None, initrd: Path | None = None,
               arm: bool = False, ram: RamFile | None = None, incoming_fd: int | None = None,
               monitor: bool = False) -> Machine:
        assets, run_dir = self._assets, self._run_dir
        if run_dir is None:
            raise SandboxClosed("the VM tier is closed")
        assert assets is not None and self._kvm is not None
        if directory is None:
            with self._lock:
                self._counter += 1
                directory = run_dir / f"m{self._counter}"
        return Machine(directory, assets, shape, kvm=self._kvm, initrd=initrd,
                       extra_cmdline=self._extra_cmdline, arm=arm, ram=ram,
                       incoming_fd=incoming_fd, monitor=monitor)
