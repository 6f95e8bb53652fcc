"""The guest's console as the host reads it: the exit line counts however late the host
reads it, and a guest that ends without one says how it ended."""

from __future__ import annotations

import os
import signal
import time

import pytest

from wasmbox import Policy, Sandbox, Task
from wasmbox.models import Status, TierName
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.guest import EXIT, READY
from wasmbox.tiers.vm.machine import Machine
from wasmbox.tiers.vm.tier import VmTier

pytestmark = pytest.mark.vm


def test_exit_line_read_after_qemu_ended_counts(vm_assets: AssetReport,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The guest powers off right after its exit line and QEMU ends milliseconds later; a
    # busy host may run the serial reader after it has seen QEMU end (the rare "stopped
    # without reporting" of issue 15). Here the reader holds the line until then.
    read_line = Machine._on_serial_line

    def read_late(self: Machine, raw: bytes) -> None:
        if EXIT.encode() in raw:
            end = time.monotonic() + 60.0
            while self.process.returncode is None and time.monotonic() < end:
                time.sleep(0.005)
        read_line(self, raw)

    monkeypatch.setattr(Machine, "_on_serial_line", read_late)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sandbox:
        result = sandbox.run(Task.command(["sh", "-c", "echo done"], tier="vm"))
    assert result.status is Status.COMPLETED, result.reason
    assert result.stdout == "done\n"


def test_guest_killed_mid_task_says_qemu_was_killed(vm_assets: AssetReport,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # QEMU killed from outside (a host OOM kill, an operator) while its task runs.
    read_line = Machine._on_serial_line

    def kill_when_ready(self: Machine, raw: bytes) -> None:
        read_line(self, raw)
        if READY.encode() in raw:
            os.killpg(self.process.pid, signal.SIGKILL)

    monkeypatch.setattr(Machine, "_on_serial_line", kill_when_ready)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sandbox:
        result = sandbox.run(Task.command(["sleep", "30"], tier="vm"))
    assert result.status is Status.CRASHED
    assert result.reason is not None
    assert "QEMU was killed by SIGKILL" in result.reason
    assert READY in result.reason  # the console's last line
