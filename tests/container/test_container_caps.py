"""Capabilities on the container tier.

Threat: a task holding a capability the policy did not grant (or more than the one it did),
or a grant that silently does nothing. Only CAP_NET_BIND_SERVICE is exercised: binding port
80 on the task's own loopback (its fresh network namespace), never the host's.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.errors import PolicyViolation, TierUnavailable
from wasmbox.models import TierName
from wasmbox.tiers.container import ContainerTier

pytestmark = pytest.mark.container

BIND_80 = """
import socket
def main(_):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 80))
        return "bound"
    except OSError as exc:
        return exc.errno
"""

STATUS = ["/bin/sh", "-c", "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status"]
NET_BIND_SERVICE = 1 << 10


@pytest.fixture(scope="module")
def granting(container_ready: None) -> Iterator[Sandbox]:
    policy = Policy(capabilities=frozenset({"CAP_NET_BIND_SERVICE"}))
    with Sandbox(policy, tiers={TierName.CONTAINER: ContainerTier}) as sb:
        yield sb


def test_granted_capability_binds_port_80(granting: Sandbox) -> None:
    r = granting.run(Task.python(BIND_80, tier="container",
                                 capabilities=["CAP_NET_BIND_SERVICE"]))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == "bound"


def test_without_the_capability_port_80_is_eacces(granting: Sandbox) -> None:
    r = granting.run(Task.python(BIND_80, tier="container"))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == 13  # EACCES


def test_the_task_gets_exactly_the_granted_set(granting: Sandbox) -> None:
    r = granting.run(Task.command(STATUS, capabilities=["CAP_NET_BIND_SERVICE"]))
    assert r.status is Status.COMPLETED, r.stderr
    fields = dict(line.split(":\t") for line in r.stdout.splitlines())
    for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == NET_BIND_SERVICE, (name, fields)
    assert fields["NoNewPrivs"] == "1"
    r = granting.run(Task.command(STATUS))
    fields = dict(line.split(":\t") for line in r.stdout.splitlines())
    assert {int(fields[n], 16) for n in ("CapPrm", "CapEff", "CapBnd", "CapAmb")} == {0}


def test_a_capability_outside_the_policy_is_a_violation(granting: Sandbox) -> None:
    with pytest.raises(PolicyViolation, match="CAP_NET_RAW") as info:
        granting.run(Task.command(["true"], capabilities=["CAP_NET_RAW"]))
    assert info.value.rule == "capabilities"


def test_the_wasm_tier_declines_capabilities(granting: Sandbox) -> None:
    r = granting.run(Task.python(BIND_80, capabilities=["CAP_NET_BIND_SERVICE"]))
    assert r.tier is TierName.CONTAINER and r.escalated_from is TierName.WASM
    assert "capabilities" in (r.escalation_reason or "")
    assert r.output == "bound"


def test_gvisor_declines_capabilities(container_ready: None) -> None:
    # runsc leaves a non-root task's effective set empty: a grant there would do nothing.
    if shutil.which("runsc") is None:
        pytest.skip("gVisor's runsc is not installed")
    policy = Policy(capabilities=frozenset({"CAP_NET_BIND_SERVICE"}))
    tiers = {TierName.CONTAINER: lambda: ContainerTier(runtime="gvisor")}
    with Sandbox(policy, tiers=tiers) as sb, pytest.raises(TierUnavailable, match="gVisor"):
        sb.run(Task.command(["true"], capabilities=["CAP_NET_BIND_SERVICE"]))
