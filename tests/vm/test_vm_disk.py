"""Disk caps in the VM tier: the guest's /tmp and its outputs stay within ``[limits] disk``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.models import Limits, MiB, TierName
from wasmbox.tiers.vm.assets import AssetReport

FILL_OUTPUT = ["/bin/sh", "-c", "head -c 3145728 /dev/zero > /task/output/fill; sleep 1"]
POLICY = Policy(limits=Limits(disk=2 * MiB))

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def disk_sandbox(vm_assets: AssetReport) -> Iterator[Sandbox]:
    from wasmbox.tiers.vm import VmTier

    policy = POLICY.model_copy(update={"min_isolation": TierName.VM})
    with Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sb:
        yield sb


def test_vm_tmp_past_the_disk_cap_is_enospc(disk_sandbox: Sandbox) -> None:
    # head's message for the failed write varies: the size kept tells the cap.
    fill = "head -c 3145728 /dev/zero > /tmp/fill; rc=$?; wc -c < /tmp/fill; exit $rc"
    r = disk_sandbox.run(Task.command(["/bin/sh", "-c", fill], tier="vm"))
    assert r.status is Status.FAILED, (r.status, r.stderr)
    assert int(r.stdout.split()[0]) <= 2 * MiB


def test_vm_outputs_past_the_disk_cap_are_rejected(disk_sandbox: Sandbox) -> None:
    r = disk_sandbox.run(Task.command(FILL_OUTPUT, tier="vm"))
    assert r.status is Status.OUTPUT_REJECTED, (r.status, r.reason)
    assert r.files == {}
