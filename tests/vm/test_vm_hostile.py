"""Hostile tasks in the VM tier: every guard trips with its exact status."""

from __future__ import annotations

import time

import pytest

from wasmbox import HostFailure, Policy, Sandbox, Task
from wasmbox.models import Limits, Resources, Status, TierName
from wasmbox.tiers.vm.assets import AssetReport

pytestmark = pytest.mark.vm


def command(*argv: str, **fields: object) -> Task:
    return Task.command(list(argv), tier="vm", **fields)  # type: ignore[arg-type]


def test_cpu_spinner_times_out(vm_sandbox: Sandbox) -> None:
    task = command("sh", "-c", "while :; do :; done", resources=Resources(timeout=3))
    result = vm_sandbox.run(task)
    assert result.status is Status.TIMEOUT
    assert result.exit_code is None


def test_fork_bomb_hits_the_pids_limit(vm_sandbox: Sandbox) -> None:
    script = "i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done; echo spawned $i"
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.FAILED
    assert "fork" in result.stderr.lower()  # dash: "Cannot fork"; busybox: "can't fork"
    assert "spawned" not in result.stdout


def test_memory_hog_is_memory_exceeded(vm_sandbox: Sandbox) -> None:
    # tail buffers a line that never ends: it grows until the cgroup stops it.
    result = vm_sandbox.run(command("tail", "/dev/zero", resources=Resources(memory="48MiB")))
    assert result.status is Status.MEMORY_EXCEEDED
    assert result.metrics.peak_memory_bytes is not None
    assert result.metrics.peak_memory_bytes <= 48 * 1024 * 1024


def test_network_is_unreachable(vm_sandbox: Sandbox) -> None:
    # /proc/net/dev: the task's root has no /sys, as in a container.
    script = ("tail -n +3 /proc/net/dev | cut -d: -f1; python3 -c "
              "'import socket; socket.create_connection((\"1.1.1.1\", 80), 2)'")
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.FAILED
    assert result.stdout.split() == ["lo"]
    assert "Network is unreachable" in result.stderr


def test_write_to_input_is_denied(vm_sandbox: Sandbox) -> None:
    script = "echo x > /task/input.json; touch /task/new; exit 0"
    result = vm_sandbox.run(command("sh", "-c", script, input={"a": 1}))
    assert result.status is Status.COMPLETED
    assert result.stderr.count("Permission denied") == 2


def test_output_flood_is_rejected(vm_sandbox: Sandbox) -> None:
    task = command("sh", "-c", "head -c 3000000 /dev/zero > /task/output/big",
                   resources=Resources(output_bytes="1MiB"))
    result = vm_sandbox.run(task)
    assert result.status is Status.OUTPUT_REJECTED
    assert result.files == {}


def test_stdout_flood_is_truncated_at_the_cap(vm_sandbox: Sandbox) -> None:
    task = command("sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a",
                   resources=Resources(stdout_bytes=65536))
    result = vm_sandbox.run(task)
    assert result.stdout_truncated
    assert len(result.stdout) == 65536


def test_task_cannot_forge_the_exit_line(vm_sandbox: Sandbox) -> None:
    script = ("echo WASMBOX-EXIT forged 0 > /dev/ttyS0; echo WASMBOX-EXIT forged 0 > /dev/console;"
              " echo WASMBOX-EXIT forged 0; exit 5")
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.FAILED
    assert result.exit_code == 5


def test_kernel_panic_mid_task_is_crashed(vm_assets: AssetReport) -> None:
    from wasmbox.tiers.vm import VmTier

    # vm.panic_on_oom=2 turns the task's cgroup OOM into a kernel panic.
    tier = VmTier(pool_size=0, extra_cmdline="sysctl.vm.panic_on_oom=2")
    with Sandbox(Policy(), tiers={TierName.VM: lambda: tier}) as sandbox:
        task = command("tail", "/dev/zero", resources=Resources(memory="48MiB", timeout=30))
        result = sandbox.run(task)
    assert result.status is Status.CRASHED
    assert result.metrics.run_s < 30  # the panic is seen, not the task's timeout (boot aside)
    # The crash says what happened: how QEMU ended and the guest kernel's panic line.
    assert result.reason is not None
    assert "QEMU exited with status 0" in result.reason
    assert "Kernel panic - not syncing" in result.reason


def test_boot_hang_is_bounded_by_the_boot_timeout(vm_assets: AssetReport) -> None:
    from wasmbox.tiers.vm import VmTier

    # An init that never prints the ready marker: both boot attempts hang. The boot has its
    # own bound (it no longer eats the task's run timeout), and a guest image that cannot
    # boot is the host's failure, not the task's: HostFailure, in bounded time.
    tier = VmTier(pool_size=0, boot_timeout=2.0, extra_cmdline="rdinit=/bin/cat")
    policy = Policy(limits=Limits(memory="128MiB"))
    t0 = time.monotonic()
    with (Sandbox(policy, tiers={TierName.VM: lambda: tier}) as sandbox,
          pytest.raises(HostFailure, match="hung twice while booting")):
        sandbox.run(command("true", resources=Resources(timeout=3)))
    assert time.monotonic() - t0 < 15  # a hang would run forever

