"""Disk: ``Resources(disk=...)`` / ``[limits] disk`` caps what a task writes.

Threat: a task filling the host's memory-backed disk (``/tmp`` is a tmpfs, outputs land in
the workspace) past what the policy allows, on any tier; a request above the policy's cap
silently honoured; a disk-full run leaving anything behind.
"""

from __future__ import annotations

import os

import pytest

from wasmbox import Policy, Sandbox, Status, Task, apply
from wasmbox.models import Limits, MiB, Resources, TierName
from wasmbox.tiers.container import ContainerTier

FILL_TMP = ["/bin/sh", "-c", "head -c 3145728 /dev/zero > /tmp/fill"]
FILL_OUTPUT = ["/bin/sh", "-c", "head -c 3145728 /dev/zero > /task/output/fill; sleep 1"]
POLICY = Policy(limits=Limits(disk=2 * MiB))


def test_a_disk_request_is_clamped_to_the_policy() -> None:
    plan = apply(POLICY, Task.command(["true"], resources=Resources(disk="1GiB")))
    assert plan.disk == 2 * MiB
    assert plan.tmpfs <= 2 * MiB and plan.output.max_total_bytes <= 2 * MiB
    assert any("disk" in w and "2MiB" in w for w in plan.warnings)
    small = apply(POLICY, Task.command(["true"], resources=Resources(disk="1MiB")))
    assert small.disk == small.tmpfs == small.output.max_total_bytes == MiB
    unset = apply(Policy(), Task.command(["true"]))
    assert unset.disk is None and unset.tmpfs == Limits().tmpfs


@pytest.mark.container
def test_tmp_past_the_disk_cap_is_enospc(container_ready: None) -> None:
    probe = ContainerTier()
    try:
        with Sandbox(POLICY, tiers={TierName.CONTAINER: ContainerTier}) as sb:
            r = sb.run(Task.command(FILL_TMP))
        assert r.status is Status.FAILED, (r.status, r.stderr)
        assert "No space left on device" in r.stderr
        assert probe.leftovers(os.getpid()) == []
    finally:
        probe.close()


@pytest.mark.container
def test_outputs_past_the_disk_cap_are_rejected(container_ready: None) -> None:
    with Sandbox(POLICY, tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.command(FILL_OUTPUT))
    assert r.status is Status.OUTPUT_REJECTED, (r.status, r.reason)
    assert str(2 * MiB) in (r.reason or "")
    assert r.files == {}


def test_wasm_outputs_past_the_disk_cap_are_rejected() -> None:
    source = ("def main(_):\n    with open('/task/output/fill', 'wb') as f:\n"
              "        f.write(bytes(3 << 20))\n")
    with Sandbox(POLICY) as sb:
        r = sb.run(Task.python(source, tier="wasm"))
    assert r.status is Status.OUTPUT_REJECTED, (r.status, r.reason)
    assert str(2 * MiB) in (r.reason or "")
