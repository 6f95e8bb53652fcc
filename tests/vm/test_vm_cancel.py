"""VM runs: a cancel stops the guest; the boot has its own bound and leaves the run its whole
timeout. Timing bounds are loose (TCG on a loaded 2-core machine)."""

from __future__ import annotations

import threading
import time

import pytest

from wasmbox import Policy, Resources, Sandbox, Status, Task
from wasmbox.models import TierName, TimeoutPolicy
from wasmbox.tiers.vm.assets import AssetReport

pytestmark = pytest.mark.vm


def test_cancel_stops_a_vm_task(vm_sandbox: Sandbox) -> None:
    # Warm the pool first, so the cancel below lands while the guest runs, not while it boots.
    assert vm_sandbox.run(Task.command(["/bin/true"], tier="vm")).ok
    time.sleep(3.0)  # the pool's next guest is ready again (a restore or a boot)
    task = Task.command(["/bin/sleep", "30"], tier="vm", resources=Resources(timeout=10))
    done: list[float] = []

    def cancel() -> None:
        time.sleep(2.0)  # the pooled guest took the task at once; now it sleeps
        vm_sandbox.cancel(task.id)
        done.append(time.monotonic())

    helper = threading.Thread(target=cancel)
    helper.start()
    result = vm_sandbox.run(task)
    ended = time.monotonic()
    helper.join()
    assert result.status is Status.CANCELLED, result
    assert ended - done[0] < 3.0  # stopped, not run out to its 10 s timeout


def test_a_cold_boot_does_not_eat_the_run_timeout(vm_assets: AssetReport) -> None:
    from wasmbox.tiers.vm import VmTier

    # No pool: every task boots its guest (~1.5-3 s under TCG here) before it runs. With a
    # 1 s run timeout the boot alone used to time the task out.
    policy = Policy(timeouts=TimeoutPolicy(run=30))
    with Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sb:
        result = sb.run(Task.command(["/bin/echo", "ran"], tier="vm",
                                     resources=Resources(timeout=1.0)))
    assert result.status is Status.COMPLETED, result
    assert result.stdout.strip() == "ran"
    assert result.metrics.startup_s > 0.5  # the boot happened, outside the run's second
