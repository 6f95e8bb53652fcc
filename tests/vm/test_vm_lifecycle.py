"""VM tier lifecycle: assets, availability, the janitor, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Task
from wasmbox.models import Status, TierName
from wasmbox.tiers.vm.assets import PREPARE_COMMAND, AssetReport, load_assets, modinfo
from wasmbox.tiers.vm.cpio import CpioWriter
from wasmbox.tiers.vm.janitor import PID_FILE, PREFIX, reclaim
from wasmbox.workspace import workspace_root

ProcessesNaming = Callable[[set[Path]], list[int]]

pytestmark = pytest.mark.vm


def test_assets_load_order_puts_dependencies_first(vm_assets: AssetReport) -> None:
    order = list(vm_assets.assets.modules)
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert {"virtio_blk", "virtio_console"} <= set(order)
    # 9p shares the host's userland with commands; ext4 (with its crc32c) mounts the python image.
    assert order.index("9pnet") < order.index("9pnet_virtio") < order.index("9p")
    assert order.index("fscache") < order.index("9p")
    assert order.index("crc32c_generic") < order.index("ext4")


def test_prepared_assets_verify_on_load(vm_assets: AssetReport) -> None:
    assets = load_assets(vm_assets.assets.root)
    assert assets.kernel.exists() and assets.initramfs.exists()


def test_modinfo_reads_a_real_module(vm_assets: AssetReport) -> None:
    import tarfile

    with tarfile.open(vm_assets.assets.root / "modules.tar") as tar:
        member = tar.extractfile("virtio_blk.ko")
        assert member is not None
        info = modinfo(member.read())
    assert "virtio" in info["depends"].split(",")


def test_availability_names_the_prepare_command(tmp_path: Path) -> None:
    from wasmbox.tiers.vm import VmTier

    tier = VmTier(assets_dir=tmp_path / "empty")
    available = tier.availability()
    assert not available.ok
    assert PREPARE_COMMAND in available.reason or "not installed" in available.reason


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_availability_says_which_accelerator_guests_get(
        vm_assets: AssetReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wasmbox doctor`` says kvm or tcg from the KVM probe's recorded answer, and that
    nothing is known yet before the first VM task has probed."""
    from wasmbox.tiers.vm import VmTier, machine

    assets_dir = tmp_path / "assets"
    shutil.copytree(vm_assets.assets.root, assets_dir,
                    ignore=shutil.ignore_patterns(machine.KVM_PROBE_FILE))
    real_access, kvm_usable = os.access, [True]

    def access(path: object, mode: int) -> bool:
        return kvm_usable[0] if path == "/dev/kvm" else real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(machine.os, "access", access)
    probe = assets_dir / machine.KVM_PROBE_FILE

    def accel() -> str:
        available = VmTier(assets_dir=assets_dir).availability()
        assert available.ok, available
        return str(available.details["accel"])

    assert accel().startswith("not probed yet")
    key = machine._probe_key(load_assets(assets_dir))
    probe.write_text(json.dumps({"key": key, "kvm": True}))
    assert accel() == "kvm"
    probe.write_text(json.dumps({"key": key, "kvm": False}))
    assert accel().startswith("tcg (/dev/kvm is present")
    probe.write_text(json.dumps({"key": "another qemu", "kvm": True}))
    assert accel().startswith("not probed yet")  # an answer for another QEMU or kernel
    probe.write_text("[1, 2]")
    assert accel().startswith("not probed yet")  # unreadable: probe again, never trust it
    kvm_usable[0] = False
    assert accel() == "tcg (no usable /dev/kvm)"


def test_cpio_archive_is_readable_by_cpio(tmp_path: Path) -> None:
    writer = CpioWriter()
    writer.directory("d")
    writer.file("d/hello.txt", b"hello")
    writer.symlink("link", "d/hello.txt")
    archive = writer.finish()
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "d" / "hello.txt").read_bytes() == b"hello"
    assert os.readlink(tmp_path / "link") == "d/hello.txt"


def test_janitor_reclaims_a_dead_owners_dir(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / f"{PREFIX}{dead.pid}-abcd"
    (run_dir / "m1").mkdir(parents=True)
    # A stand-in for QEMU: its command line names the run dir, as QEMU's does.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               str(run_dir)])
    (run_dir / "m1" / PID_FILE).write_text(str(orphan.pid))
    try:
        _wait_for_cmdline(orphan.pid, str(run_dir))
        assert reclaim(tmp_path) == [run_dir]
        assert orphan.wait(timeout=10) == -9
        assert not run_dir.exists()
    finally:
        orphan.kill()
        orphan.wait()


def _wait_for_cmdline(pid: int, needle: str) -> None:
    for _ in range(500):
        if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never showed {needle} in its command line")


def test_janitor_spares_a_live_owners_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / f"{PREFIX}{os.getpid()}-abcd"
    run_dir.mkdir()
    assert reclaim(tmp_path) == []
    assert run_dir.exists()


def test_nothing_is_left_after_close(vm_assets: AssetReport,
                                     processes_naming: ProcessesNaming) -> None:
    from wasmbox.tiers.vm import VmTier

    root = Path(workspace_root())
    before = set(root.glob(f"{PREFIX}*"))
    with Sandbox(Policy(), tiers={TierName.VM: lambda: VmTier(pool_size=1)}) as sandbox:
        result = sandbox.run(Task.command(["true"], tier="vm"))
        assert result.status is Status.COMPLETED
        ours = set(root.glob(f"{PREFIX}*")) - before
        assert ours  # the tier's run dir (with a pooled guest booting in it)
    assert not any(d.exists() for d in ours)
    assert processes_naming(ours) == []


def test_network_request_is_refused_not_ignored(vm_assets: AssetReport) -> None:
    from wasmbox.errors import PolicyViolation
    from wasmbox.models import NetworkPolicy
    from wasmbox.tiers.vm import VmTier

    policy = Policy(network=NetworkPolicy(enabled=True))
    with (
        Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sandbox,
        pytest.raises(PolicyViolation, match="no network"),
    ):
        sandbox.run(Task.command(["true"], tier="vm", network=True))
