"""Threat: the VM guest's shared host userland is a way out of the guest.

A command in a VM guest sees the host's /usr (and merged-/usr's /bin, /lib, /sbin links)
through a read-only 9p export served by QEMU, so that it finds the same programs as in a
container. A hostile task must not write through that export into the host (neither as the
task's uid nor as a task that became root inside its guest), gain privileges from the
host's setuid programs, or see any host path beyond the shared userland (/root, /etc/shadow)
or the guest's own machinery (the root-only job with the exit nonce, the output staging).
"""

from __future__ import annotations

import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import conftest as vm_fixtures
from wasmbox import Policy, Sandbox, Task
from wasmbox.models import Status, TierName
from wasmbox.policy import apply
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.guest import make_bundle
from wasmbox.tiers.vm.machine import Machine
from wasmbox.tiers.vm.tier import VmTier

pytestmark = pytest.mark.vm
vm_assets = vm_fixtures.vm_assets


@pytest.fixture(scope="module")
def vm_sandbox(vm_assets: AssetReport) -> Iterator[Sandbox]:
    """This module's own VM sandbox, closed when the module ends: the session one in
    tests/vm would keep a pooled QEMU alive through every later test directory (whose leak
    checks would then see it)."""
    with Sandbox(Policy(), tiers={TierName.VM: lambda: VmTier(pool_size=1)}) as sandbox:
        available = sandbox.availability(TierName.VM)
        if not available.ok:
            pytest.fail(f"assets were prepared but the VM tier is unavailable: {available}")
        yield sandbox

BOOT_TIMEOUT = 120.0  # a cold TCG boot on a loaded 2-core host


def command(*argv: str) -> Task:
    return Task.command(list(argv), tier="vm")


def test_task_sees_only_the_userland_and_its_own_dirs(vm_sandbox: Sandbox) -> None:
    script = ("ls -A /; for p in /root /etc/shadow /home /job /ship /py /wasmbox; do "
              "[ -e $p ] && echo LEAK $p; done; exit 0")
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.COMPLETED, result
    assert "LEAK" not in result.stdout
    top = set(result.stdout.split())
    assert top <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc",
                   "sbin", "task", "tmp", "usr"}
    assert {"usr", "task", "tmp"} <= top


def test_usr_is_mounted_read_only_without_setuid_or_devices(vm_sandbox: Sandbox) -> None:
    script = ("while read -r _ _ _ _ point opts _; do [ \"$point\" = /usr ] && echo $opts; "
              "done < /proc/self/mountinfo; touch /usr/wbx-probe 2>/dev/null && echo WROTE; "
              "exit 0")
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.COMPLETED, result
    lines = result.stdout.split()
    assert "WROTE" not in lines
    options = set(lines[0].split(","))
    assert {"ro", "nosuid", "nodev"} <= options


def test_task_cannot_gain_privileges(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("grep", "-E", "^(NoNewPrivs|Uid|CapEff)", "/proc/self/status"))
    assert result.status is Status.COMPLETED, result
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Uid"].split() == ["1000"] * 4
    assert int(fields["CapEff"], 16) == 0


@pytest.fixture
def host_probe() -> Iterator[Path]:
    """A path in the host's /usr that a guest must never create (removed if it did)."""
    probe = Path("/usr") / f"wbx-probe-{secrets.token_hex(8)}"
    yield probe
    probe.unlink(missing_ok=True)


def test_guest_root_cannot_write_through_the_share(vm_assets: AssetReport, host_probe: Path,
                                                   tmp_path: Path) -> None:
    # The job runs as root in the guest: it mounts the export read-write and writes.
    assets = vm_assets.assets
    assert assets.userland, "assets built without wbx-run share no userland"
    tier = VmTier(pool_size=0)
    try:
        plan = apply(Policy(), Task.command(["true"], tier="vm"))
        shape = tier._shape(plan, assets)
    finally:
        tier.close()
    task = tmp_path / "task"
    task.mkdir()
    bundle = make_bundle(plan, str(task), 60.0, assets.userland)
    job = bundle.files["job/job.sh"][0].decode().split("task()")[0]
    job += ("task() { mkdir -p /mnt/usr && mount -t 9p -o trans=virtio,version=9p2000.L "
            f"wbx-usr /mnt/usr && echo mounted; echo x > /mnt/usr/{host_probe.name} "
            "&& echo WROTE; mount -o remount,rw /mnt/usr; "
            f"echo x > /mnt/usr/{host_probe.name} && echo WROTE; exit 0; }}\n")
    bundle.files["job/job.sh"] = (job.encode(), 0o700)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(assets.initramfs.read_bytes() + bundle.as_cpio())
    machine = Machine(tmp_path / "m", assets, shape, kvm=False, initrd=initrd)
    try:
        machine.expect(bundle.nonce)
        assert machine.wait_ready(BOOT_TIMEOUT), machine.serial_tail()
        line = machine.wait_exit(BOOT_TIMEOUT)
        assert line is not None and line.code == 0, machine.serial_tail()
        machine.stop()
        stdout = _stream(machine, "stdout")
    finally:
        machine.close()
    assert "mounted" in stdout  # the write was really attempted through the share
    assert "WROTE" not in stdout
    assert not host_probe.exists()


def _stream(machine: Machine, name: str) -> str:
    with tarfile.open(machine.output_image) as tar:
        member = tar.extractfile(f"streams/{name}")
        return member.read().decode() if member is not None else ""

