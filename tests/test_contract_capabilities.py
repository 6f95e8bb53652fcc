"""Capabilities as data: what each tier can give a task is declared (`TierCapabilities`) and
checked in one place (`check_capabilities`), with one error type and one message shape per
fact, whichever tier declines it.

Threat covered: a plan reaching a tier that cannot honour it and silently losing a guard.
A WASI preopen cannot mask a path inside it, so a wasm run of a plan with hidden paths
would show the guest exactly what the policy hides; the check must refuse it before any
workspace or Store exists, whoever calls the tier.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Task
from wasmbox.errors import PolicyViolation, TierDeclined, TierUnavailable
from wasmbox.models import FilesystemPolicy, NetworkPolicy, TaskKind, TierName
from wasmbox.policy import Plan, apply
from wasmbox.tiers.base import TierCapabilities, check_capabilities
from wasmbox.tiers.container.tier import CRUN, GVISOR, ContainerTier
from wasmbox.tiers.vm.tier import VmTier
from wasmbox.tiers.wasm import WasmTier

SOURCE = "def main(_):\n    return 1\n"
OFFERS = {TierName.WASM: WasmTier.capabilities, TierName.CONTAINER: ContainerTier.capabilities,
          TierName.VM: VmTier.capabilities}


def _plans(tmp_path: Path) -> dict[str, Plan]:
    """One plan per fact a tier may lack, each asking for just that (Python: every tier
    runs Python tasks, so only the fact itself can be declined)."""
    (tmp_path / "data" / "secrets").mkdir(parents=True)
    base = apply(Policy(), Task.command(["true"], tier="container"))
    networked = apply(Policy(network=NetworkPolicy(outbound=True)),
                      Task.python(SOURCE, tier="container", network=True))
    caps = apply(Policy(capabilities=frozenset({"CAP_NET_BIND_SERVICE"})),
                 Task.python(SOURCE, tier="container",
                             capabilities=["CAP_NET_BIND_SERVICE"]))
    mounts = FilesystemPolicy(readonly={"/data": tmp_path / "data"})
    hidden = FilesystemPolicy(readonly={"/data": tmp_path / "data"}, hidden=("/data/secrets",))
    return {
        "network.enabled": networked,
        "capabilities": caps,
        "filesystem.hidden": apply(Policy(filesystem=hidden),
                                   Task.python(SOURCE, tier="container")),
        "filesystem": apply(Policy(filesystem=mounts), Task.python(SOURCE, tier="container")),
        "tier": dataclasses.replace(base, task=Task.wasm(b"\0asm\1\0\0\0")),
    }


SHAPES = {
    "network.enabled": "the {tier} tier gives tasks no network",
    "capabilities": "the {tier} tier cannot grant capabilities",
    "filesystem.hidden": "the {tier} tier cannot hide /data/secrets",
    "filesystem": "the {tier} tier cannot grant extra mounts",
    "tier": "the {tier} tier cannot run wasm tasks",
}


@pytest.mark.parametrize("tier", list(OFFERS))
@pytest.mark.parametrize("rule", list(SHAPES))
def test_one_error_and_one_message_shape_per_fact(tier: TierName, rule: str,
                                                  tmp_path: Path) -> None:
    plan = _plans(tmp_path)[rule]
    offers = OFFERS[tier]
    lacks = {
        "network.enabled": not offers.network, "capabilities": not offers.capabilities,
        "filesystem.hidden": not offers.hidden_paths, "filesystem": not offers.mounts,
        "tier": TaskKind.WASM not in offers.kinds,
    }[rule]
    if not lacks:
        check_capabilities(tier, offers, plan)  # granted: no error
        return
    with pytest.raises(TierDeclined) as caught:
        check_capabilities(tier, offers, plan)
    exc = caught.value
    assert exc.rule == rule and exc.tier == str(tier)
    assert exc.reason == SHAPES[rule].format(tier=tier)
    # Both of what callers catch today: auto escalates past it, explicit callers see the rule.
    assert isinstance(exc, TierUnavailable) and isinstance(exc, PolicyViolation)


def test_what_each_tier_declines_is_data() -> None:
    assert WasmTier.capabilities == TierCapabilities(
        kinds=frozenset({TaskKind.WASM, TaskKind.PYTHON}))
    assert ContainerTier.capabilities is CRUN and CRUN.network and CRUN.hidden_paths
    assert not GVISOR.network and not GVISOR.capabilities and GVISOR.hidden_paths
    assert not VmTier.capabilities.mounts and not VmTier.capabilities.network


def test_a_runtime_note_says_what_would_serve_it(tmp_path: Path) -> None:
    with pytest.raises(TierDeclined, match="no network under gVisor: that needs crun or runc"):
        check_capabilities(TierName.CONTAINER, GVISOR, _plans(tmp_path)["network.enabled"])


def test_the_wasm_tier_itself_refuses_hidden_paths(tmp_path: Path, module_cache: Path,
                                                   guests: dict[str, Path]) -> None:
    data = tmp_path / "data"
    (data / "secrets").mkdir(parents=True)
    (data / "secrets" / "key.txt").write_text("TOPSECRET")
    policy = Policy(filesystem=FilesystemPolicy(readonly={"/data": data},
                                                hidden=("/data/secrets",)))
    plan = apply(policy, Task.wasm(guests["hello"]))
    with WasmTier(module_cache) as tier, pytest.raises(TierDeclined, match="cannot hide"):
        tier.prepare(plan)  # called directly, not through a Sandbox: still refused


def test_an_explicit_tier_raises_and_auto_escalates_with_the_same_words(
        module_cache: Path, guests: dict[str, Path]) -> None:
    policy = Policy(network=NetworkPolicy(outbound=True), allowed_tiers={TierName.WASM})
    with Sandbox(policy, tiers={TierName.WASM: lambda: WasmTier(module_cache)}) as sb:
        with pytest.raises(TierDeclined, match="the wasm tier gives tasks no network"):
            sb.run(Task.wasm(guests["hello"], tier="wasm", network=True))
        with pytest.raises(TierUnavailable, match="the wasm tier gives tasks no network"):
            sb.run(Task.python("def main(_):\n    return 1\n", network=True))


def test_the_error_survives_pickling() -> None:
    exc = TierDeclined("vm", "capabilities", "the vm tier cannot grant capabilities")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is TierDeclined and str(back) == str(exc)
    assert (back.tier, back.rule, back.reason) == (exc.tier, exc.rule, exc.reason)
