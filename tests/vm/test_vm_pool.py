"""The VM tier's pool: a guest serves one task, hits and misses are counted, close kills all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from wasmbox import Policy, Sandbox, Task
from wasmbox.models import Status, TierName
from wasmbox.policy import apply
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.janitor import PREFIX
from wasmbox.tiers.vm.pool import MachinePool
from wasmbox.tiers.vm.tier import VmTier
from wasmbox.workspace import workspace_root

pytestmark = pytest.mark.vm

BOOT_ID = Task.command(["cat", "/proc/sys/kernel/random/boot_id"], tier="vm")
WARM_TIMEOUT = 60.0  # far past a TCG boot (~1.5 s): only a broken pool takes this long


def _count(result: str) -> float:
    value = REGISTRY.get_sample_value("wasmbox_pool_requests_total",
                                      {"tier": "vm", "result": result})
    return value or 0.0


@pytest.fixture
def pooled(vm_assets: AssetReport) -> Iterator[tuple[Sandbox, VmTier]]:
    """A sandbox over its own VM tier with one guest booted ahead for BOOT_ID's shape."""
    tier = VmTier(pool_size=1)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: tier}) as sandbox:
        tier.prepare(apply(sandbox.policy, BOOT_ID))
        assert tier.wait_warm(WARM_TIMEOUT)
        yield sandbox, tier


def _pool(tier: VmTier) -> MachinePool:
    assert tier.pool is not None
    return tier.pool


def test_each_pooled_task_gets_a_freshly_booted_guest(
    pooled: tuple[Sandbox, VmTier],
) -> None:
    sandbox, tier = pooled
    hits, misses = _count("hit"), _count("miss")
    first = sandbox.run(BOOT_ID)
    assert tier.wait_warm(WARM_TIMEOUT)
    second = sandbox.run(BOOT_ID)
    assert first.status is second.status is Status.COMPLETED
    assert (_count("hit") - hits, _count("miss") - misses) == (2.0, 0.0)
    assert len(first.stdout.strip()) == 36  # a uuid, made by each guest kernel at boot
    assert first.stdout != second.stdout


def test_pool_hits_and_misses_are_counted(pooled: tuple[Sandbox, VmTier]) -> None:
    sandbox, tier = pooled
    hits, misses = _count("hit"), _count("miss")
    [idle] = _pool(tier).idle_items()
    idle.process.kill()  # a guest that died while waiting is not handed out
    idle.process.wait()
    cold = sandbox.run(BOOT_ID)
    assert (_count("hit") - hits, _count("miss") - misses) == (0.0, 1.0)
    assert tier.wait_warm(WARM_TIMEOUT)
    warm = sandbox.run(BOOT_ID)
    assert cold.status is warm.status is Status.COMPLETED
    assert (_count("hit") - hits, _count("miss") - misses) == (1.0, 1.0)


def test_close_stops_every_pooled_guest(
    vm_assets: AssetReport, processes_naming: Callable[[set[Path]], list[int]],
) -> None:
    root = Path(workspace_root())
    before = set(root.glob(f"{PREFIX}*"))
    tier = VmTier(pool_size=2)
    tier.prepare(apply(Policy(), BOOT_ID))
    assert _pool(tier).wait_filled(WARM_TIMEOUT)  # both started, booting or waiting
    machines = _pool(tier).idle_items()
    ours = set(root.glob(f"{PREFIX}*")) - before
    assert len(machines) == 2 and ours
    tier.close()
    assert all(m.closed and m.process.poll() is not None for m in machines)
    assert not any(d.exists() for d in ours)
    assert processes_naming(ours) == []


def test_close_while_the_pool_boots_leaves_nothing(
    vm_assets: AssetReport, processes_naming: Callable[[set[Path]], list[int]],
) -> None:
    root = Path(workspace_root())
    before = set(root.glob(f"{PREFIX}*"))
    tier = VmTier(pool_size=2)
    tier.prepare(apply(Policy(), BOOT_ID))  # the refill thread starts booting now
    ours = set(root.glob(f"{PREFIX}*")) - before
    tier.close()
    assert ours
    assert not any(d.exists() for d in ours)
    assert processes_naming(ours) == []
