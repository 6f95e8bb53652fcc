"""The VM tier: each task runs in its own QEMU guest (KVM when it really works, else TCG).

A guest is never reused: a pooled machine waits on its virtio-serial port for one task and is
destroyed afterwards. The pool makes its machines by restoring a snapshot of a template guest
of the shape (see `snapshot`), and by booting when there is no snapshot (Python shapes, no
entropy helper, or a snapshot that failed: the reason is kept in `snapshot_failures`).
Without a warm machine the task is appended to the initramfs as a cpio and the guest is
booted cold.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wasmbox._config import HostConfig
from wasmbox.errors import HostFailure, TierUnavailable
from wasmbox.lifecycle import Deadline, shielded
from wasmbox.models import Status, TaskKind, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan
from wasmbox.tiers.base import Availability, Outcome, TierCapabilities, check_capabilities
from wasmbox.tiers.vm.assets import PREPARE_COMMAND, AssetError, Assets, load_assets
from wasmbox.tiers.vm.collect import unpack as _unpack  # noqa: F401 (tests import it here)
from wasmbox.tiers.vm.finish import finish
from wasmbox.tiers.vm.guest import Bundle, guest_sizes, make_bundle, output_disk_bytes
from wasmbox.tiers.vm.janitor import claim_run_dir, kill_machines
from wasmbox.tiers.vm.machine import (
    KVM_PROBE_FILE,
    QEMU,
    Machine,
    Shape,
    accelerator_note,
    guest_memory_mib,
    probe_kvm,
)
from wasmbox.tiers.vm.pool import MachinePool
from wasmbox.tiers.vm.reaper import Reaper
from wasmbox.tiers.vm.snapshot import Snapshot
from wasmbox.tiers.vm.supply import MachineSupply
from wasmbox.workspace import Workspace, remove_tree

BOOT_TIMEOUT = 20.0  # a TCG boot takes 1.3-1.7 s here; far past that the boot has hung
SHIP_MARGIN = 0.3  # seconds the guest keeps back from the deadline to ship its outputs


@dataclass(frozen=True)
class VmPrepared:
    """A plan ready to run: the tier's run directory and the guest shape it needs."""

    plan: Plan
    run_dir: Path
    shape: Shape
    userland: tuple[str, ...]  # the host directories the guest shares read-only


class VmTier(MachineSupply):
    """Runs command and Python tasks in throwaway QEMU guests; `pool_size` keeps some warm,
    restored from per-shape snapshots unless `snapshots` is False."""

    name = TierName.VM
    capabilities = TierCapabilities(kinds=frozenset({TaskKind.COMMAND, TaskKind.PYTHON}),
                                    mounts=False)

    def __init__(self, pool_size: int = 1, *, boot_timeout: float = BOOT_TIMEOUT,
                 assets_dir: Path | None = None, extra_cmdline: str = "",
                 snapshots: bool = True, config: HostConfig | None = None) -> None:
        """`config` says where run directories and (without `assets_dir`) assets live."""
        self._config = config or HostConfig.from_env()
        self._pool_size = pool_size
        self._use_snapshots = snapshots
        self._snapshot_lock = threading.Lock()
        self._snapshots: dict[Shape, Snapshot] = {}
        self._snapshot_failures: dict[Shape, str] = {}
        self._booted_first: set[Shape] = set()
        self._boot_timeout = boot_timeout
        self._assets_dir = assets_dir or self._config.vm_cache
        self._extra_cmdline = extra_cmdline
        self._lock = threading.Lock()
        self._assets: Assets | None = None
        self._run_dir: Path | None = None
        self._kvm: bool | None = None
        self._counter = 0
        self._pool: MachinePool | None = None
        self._reaper: Reaper | None = None
        self._boot_estimate = 1.5

    def availability(self) -> Availability:
        """Ready when QEMU is installed and the assets are prepared; says what is missing."""
        if shutil.which(QEMU) is None:
            return Availability(self.name, False, f"{QEMU} is not installed "
                                "(Debian package qemu-system-x86)")
        try:
            assets = load_assets(self._assets_dir)
        except AssetError as exc:
            return Availability(self.name, False, str(exc))
        details = {"kernel": assets.kernel_version, "assets": str(assets.root),
                   "python": "yes" if assets.python_image else "no"}
        details["accel"] = (accelerator_note(assets, self._assets_dir / KVM_PROBE_FILE)
                            if self._kvm is None else "kvm" if self._kvm else "tcg")
        details["snapshots"] = self._snapshot_note(assets)
        return Availability(self.name, True, "QEMU guests", details)

    def prepare(self, plan: Plan) -> VmPrepared:
        """Check the plan against what guests here can have, load the assets, probe KVM
        once, and start warming the pool for the plan's shape.

        Raises `TierDeclined` for what guests cannot have (network, capabilities, mounts)
        and `TierUnavailable` when the assets are missing.
        """
        check_capabilities(self.name, self.capabilities, plan)
        packages = _packages_unsuitable(plan)
        if packages is not None:
            raise TierUnavailable(str(self.name), packages)
        assets, run_dir = self._setup()
        if plan.task.kind is TaskKind.PYTHON and assets.python_image is None:
            raise TierUnavailable(str(self.name), "no python image: install python3 and run "
                                  f"`{PREPARE_COMMAND}`")
        shape = self._shape(plan, assets)
        if self._pool is not None:
            self._pool.warm(shape)
        return VmPrepared(plan, run_dir, shape, assets.userland)

    def unsuitable(self, prepared: VmPrepared) -> str | None:
        """Never: what guests here cannot have, `prepare` declines."""
        return None

    @property
    def pool(self) -> MachinePool | None:
        """The guests booted ahead (None before the first task, or with `pool_size=0`)."""
        return self._pool

    def wait_warm(self, timeout: float) -> bool:
        """Block until finished guests are removed and a pooled guest is ready (True), or
        `timeout` passes; for benchmarks and tests."""
        end = time.monotonic() + timeout
        pool, reaper = self._pool, self._reaper
        return (pool is not None and (reaper is None or reaper.wait_idle(timeout))
                and pool.wait_ready(max(0.0, end - time.monotonic())))

    def run(self, prepared: VmPrepared, workspace: Workspace, deadline: Deadline,
            monitor: Monitor) -> Outcome:
        """Run the task in a fresh guest, never reused: it is stopped and removed when this
        returns, or just after (by the tier's reaper, and by `close()` at the latest)."""
        t0 = time.monotonic()
        self._ensure_open()
        plan, run_dir, shape = prepared.plan, prepared.run_dir, prepared.shape
        if deadline.cancelled:
            return _timeout("cancelled before the guest was ready", t0)
        pool = self._pool
        # Getting a guest (pooled, restored or booted) has its own bound, the boot timeout:
        # it does not eat the task's run timeout, which starts once a guest is ready.
        machine = (pool.take_ready(shape, self._boot_timeout, self._refill_wait(shape))
                   if pool else None)
        try:
            if deadline.cancelled:
                return _timeout("cancelled before the guest was ready", t0)
            if machine is not None:
                deadline.restart(plan.timeout)
                bundle = make_bundle(plan, workspace.task_dir, self._guest_timeout(deadline, 0),
                                     prepared.userland)
                machine.send(bundle.as_tar(), bundle.nonce, _left(deadline, 5.0))
                startup = time.monotonic() - t0
            else:
                machine, bundle = self._boot_cold(plan, workspace, deadline, shape, run_dir)
                if machine is None:
                    return _timeout("cancelled while the guest booted", t0)
                startup = time.monotonic() - t0
            return finish(plan, workspace, deadline, monitor, machine, self._kvm, t0, startup)
        finally:
            if machine is not None:
                with shielded():
                    self._dispose(machine)

    def _setup(self) -> tuple[Assets, Path]:
        with self._lock:
            self._ensure_open()
            if self._assets is None or self._run_dir is None:
                try:
                    self._assets = load_assets(self._assets_dir)
                except AssetError as exc:
                    raise TierUnavailable(str(self.name), str(exc)) from exc
                try:
                    self._run_dir = claim_run_dir(self._config.workspace_root)
                except OSError as exc:
                    raise HostFailure(f"cannot create the VM run directory: {exc}") from exc
                root = self._assets_dir
                self._kvm = probe_kvm(self._assets, self._run_dir, root / KVM_PROBE_FILE)
                self._reaper = Reaper()
                if self._pool_size > 0:
                    self._pool = MachinePool(self._pool_size, self._pooled_machine)
            return self._assets, self._run_dir

    def _shape(self, plan: Plan, assets: Assets) -> Shape:
        # Guest RAM and disk sizes follow the policy's maxima, not the task's requests (the
        # guest enforces those with a cgroup): every task of a kind and policy fits one shape.
        python = plan.task.kind is TaskKind.PYTHON and assets.python_image is not None
        return Shape(
            memory_mib=guest_memory_mib(plan.policy.limits.memory),
            vcpus=max(1, math.ceil(plan.cpus)),
            output_bytes=output_disk_bytes(plan),
            python=python,
            sizes=guest_sizes(plan, python),
            packages=tuple(str(Path(p).resolve()) for p in plan.policy.python.packages),
        )

    def _boot_cold(self, plan: Plan, workspace: Workspace, deadline: Deadline, shape: Shape,
                   run_dir: Path) -> tuple[Machine | None, Bundle]:
        """Boot with the task appended to the initramfs; one retry if the boot hangs."""
        assets = self._assets
        assert assets is not None
        # The guest's own timer starts when the task does, after the boot.
        bundle = make_bundle(plan, workspace.task_dir,
                             3600.0 if plan.timeout is None
                             else max(0.05, plan.timeout - SHIP_MARGIN), assets.userland)
        with self._lock:
            self._counter += 1
            initrd = run_dir / f"initrd-{self._counter}"
        try:
            with open(initrd, "wb") as f:
                with open(assets.initramfs, "rb") as base:
                    shutil.copyfileobj(base, f)
                f.write(bundle.as_cpio())
            for _attempt in range(2):
                machine = self._boot_machine(shape, initrd)
                try:
                    machine.expect(bundle.nonce)
                    ready = machine.wait_ready(self._boot_timeout, starved_grace=True)
                except BaseException:
                    machine.close()
                    raise
                if ready:
                    if machine.ready_at is not None:
                        self._boot_estimate = machine.ready_at - machine.started
                    deadline.restart(plan.timeout)  # the run's clock starts now
                    return machine, bundle
                hung = machine.alive
                reason = machine.qemu_errors() or machine.serial_tail()
                machine.close()
                if deadline.cancelled:
                    return None, bundle
                if not hung:
                    raise HostFailure(f"the guest died while booting: {reason[-500:]}")
            raise HostFailure("the guest hung twice while booting")
        except OSError as exc:
            raise HostFailure(f"cannot stage the guest's initramfs: {exc}") from exc
        finally:
            initrd.unlink(missing_ok=True)

    def _guest_timeout(self, deadline: Deadline, boot: float) -> float:
        left = deadline.remaining()
        return 3600.0 if left is None else max(0.05, left - boot - SHIP_MARGIN)

    def _release(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            run_dir, self._run_dir = self._run_dir, None
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.close()  # the guests of finished tasks, before the run dir goes
        if run_dir is not None:
            # A template booting in the refill thread would hold up `pool.close()`.
            for snapshot_dir in run_dir.glob("s*"):
                kill_machines(snapshot_dir)
        if pool is not None:
            pool.close()
        with self._snapshot_lock:
            snapshots, self._snapshots = list(self._snapshots.values()), {}
        for snapshot in snapshots:
            snapshot.discard()
        if run_dir is not None:
            kill_machines(run_dir)
            remove_tree(run_dir)


def _packages_unsuitable(plan: Plan) -> str | None:
    """Why the policy's packages cannot be shared with a guest (wheels, missing dirs)."""
    for package in plan.policy.python.packages:
        if not Path(package).is_dir():
            return (f"the VM tier shares package directories only, and {package} is not one "
                    "(unpack a wheel with `pip install --target DIR`)")
        if any(c in str(Path(package).resolve()) for c in ",= \n"):
            return f"the VM tier cannot share {package}: its path has ',', '=' or whitespace"
        if Path(package).stat().st_mode & 0o005 != 0o005:
            # The guest checks the host's modes; its task user is no owner of the files.
            return (f"the VM tier's task user cannot read {package}: make it readable and "
                    "searchable by others (chmod o+rx)")
    return None


def _left(deadline: Deadline, cap: float) -> float:
    left = deadline.remaining()
    return cap if left is None else min(cap, left)


def _timeout(reason: str, t0: float) -> Outcome:
    return Outcome(status=Status.TIMEOUT, reason=reason, startup_s=time.monotonic() - t0)
