"""What the VM tier cannot enforce it declines, with the reason, rather than ignore."""

from __future__ import annotations

import pytest

from wasmbox import Policy, PolicyViolation, Sandbox, Task
from wasmbox.models import TierName
from wasmbox.tiers.vm.assets import AssetReport

pytestmark = pytest.mark.vm


def test_the_vm_tier_declines_capabilities(vm_assets: AssetReport) -> None:
    from wasmbox.tiers.vm import VmTier

    policy = Policy(capabilities=frozenset({"CAP_NET_BIND_SERVICE"}))
    with (Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0)}) as sb,
          pytest.raises(PolicyViolation, match="cannot grant capabilities")):
        sb.run(Task.command(["true"], tier="vm", capabilities=["CAP_NET_BIND_SERVICE"]))
