"""Policy application: clamping, tier resolution and the rules that reject."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wasmbox import Policy, PolicyViolation, Resources, Task, TierName, apply
from wasmbox.models import Limits, NetworkPolicy, OutputPolicy, TimeoutPolicy, WasiPolicy
from wasmbox.policy import Plan

MODULE = b"\0asm\1\0\0\0"


def test_requests_above_the_maxima_are_clamped() -> None:
    policy = Policy(limits=Limits(memory="64M", fuel=1000), timeouts=TimeoutPolicy(run=2))
    request = Resources(memory="1G", fuel=10**9, timeout=60)
    plan = apply(policy, Task.wasm(MODULE, resources=request))
    assert (plan.memory, plan.fuel, plan.timeout) == (64 << 20, 1000, 2)


def test_requests_below_the_maxima_are_kept() -> None:
    plan = apply(Policy(), Task.wasm(MODULE, resources=Resources(memory="8M", timeout="100ms")))
    assert plan.memory == 8 << 20
    assert plan.timeout == pytest.approx(0.1)


def test_unset_requests_take_the_maxima() -> None:
    policy = Policy()
    plan = apply(policy, Task.wasm(MODULE))
    assert plan.memory == policy.limits.memory
    assert plan.fuel == policy.limits.fuel


def test_a_smaller_output_request_lowers_the_output_caps() -> None:
    plan = apply(Policy(), Task.wasm(MODULE, resources=Resources(output_bytes=1000)))
    assert plan.output.max_total_bytes == 1000
    assert plan.output.max_file_bytes == 1000


@given(
    request=st.integers(min_value=1, max_value=2**40),
    maximum=st.integers(min_value=1, max_value=2**40),
    fuel=st.integers(min_value=1, max_value=2**62),
    max_fuel=st.integers(min_value=1, max_value=2**62),
    timeout=st.floats(min_value=1e-3, max_value=1e6),
    max_timeout=st.floats(min_value=1e-3, max_value=1e6),
)
def test_clamping_never_exceeds_a_maximum(
    request: int, maximum: int, fuel: int, max_fuel: int, timeout: float, max_timeout: float
) -> None:
    policy = Policy(limits=Limits(memory=maximum, fuel=max_fuel),
                    timeouts=TimeoutPolicy(run=max_timeout))
    task = Task.wasm(MODULE, resources=Resources(memory=request, fuel=fuel, timeout=timeout))
    plan = apply(policy, task)
    assert plan.memory <= maximum and plan.memory == min(request, maximum)
    assert plan.fuel is not None and plan.fuel <= max_fuel
    assert plan.timeout is not None and plan.timeout <= max_timeout


def test_network_is_refused_unless_the_policy_enables_it() -> None:
    with pytest.raises(PolicyViolation) as info:
        apply(Policy(), Task.command(["true"], network=True))
    assert info.value.rule == "network.enabled"
    assert apply(Policy(network=NetworkPolicy(enabled=True)), Task.command(["true"], network=True))


def test_a_forbidden_tier_names_the_rule() -> None:
    policy = Policy(allowed_tiers=frozenset({TierName.WASM}))
    with pytest.raises(PolicyViolation) as info:
        apply(policy, Task.command(["true"]))
    assert info.value.rule == "allowed_tiers"


def test_a_tier_below_min_isolation_is_refused() -> None:
    policy = Policy(min_isolation=TierName.CONTAINER)
    with pytest.raises(PolicyViolation) as info:
        apply(policy, Task.python("print(1)", tier="wasm"))
    assert info.value.rule == "min_isolation"


def test_auto_picks_the_lightest_tier_that_runs_the_kind() -> None:
    assert apply(Policy(), Task.python("x = 1")).tier is TierName.WASM
    assert apply(Policy(), Task.command(["true"], tier="auto")).tier is TierName.CONTAINER
    vm_only = Policy(min_isolation=TierName.VM)
    assert apply(vm_only, Task.python("x = 1")).tier is TierName.VM


def test_a_wasm_module_cannot_go_to_the_container_tier() -> None:
    with pytest.raises(PolicyViolation) as info:
        apply(Policy(), Task.wasm(MODULE, tier="container"))
    assert info.value.rule == "tier"


def test_env_names_outside_the_allowlist_are_refused() -> None:
    policy = Policy(wasi=WasiPolicy(env_allow=("APP_*",)))
    assert apply(policy, Task.wasm(MODULE, env={"APP_MODE": "x"})).env == {"APP_MODE": "x"}
    with pytest.raises(PolicyViolation) as info:
        apply(policy, Task.wasm(MODULE, env={"LD_PRELOAD": "x"}))
    assert info.value.rule == "wasi.env_allow"


def test_policy_env_is_injected_and_wins() -> None:
    policy = Policy(wasi=WasiPolicy(env={"MODE": "policy"}))
    assert apply(policy, Task.wasm(MODULE, env={"MODE": "task"})).env == {"MODE": "policy"}


def test_oversized_args_are_refused() -> None:
    policy = Policy(limits=Limits(args_bytes=100))
    with pytest.raises(PolicyViolation) as info:
        apply(policy, Task.wasm(MODULE, args=("x" * 200,)))
    assert info.value.rule == "limits.args_bytes"


def test_an_unpinned_module_is_refused_when_pins_are_required() -> None:
    policy = Policy(wasi=WasiPolicy(require_sha256=True))
    with pytest.raises(PolicyViolation) as info:
        apply(policy, Task.wasm(MODULE))
    assert info.value.rule == "wasi.require_sha256"


# Every `Resources` field: its policy maximum, and the plan value a tier enforces. A field
# added to `Resources` without an entry here fails `test_every_resources_field_is_clamped`.
CLAMPS: dict[str, tuple[Callable[[Policy], float | None], Callable[[Plan], float | None]]] = {
    "fuel": (lambda p: p.limits.fuel, lambda plan: plan.fuel),
    "memory": (lambda p: p.limits.memory, lambda plan: plan.memory),
    "timeout": (lambda p: p.timeouts.run, lambda plan: plan.timeout),
    "output_bytes": (lambda p: p.output.max_total_bytes,
                     lambda plan: plan.output.max_total_bytes),
    "stdout_bytes": (lambda p: p.limits.stdout_bytes, lambda plan: plan.stdout_bytes),
    "cpus": (lambda p: p.limits.cpus, lambda plan: plan.cpus),
    "pids": (lambda p: p.limits.pids, lambda plan: plan.pids),
}

sizes = st.integers(min_value=1, max_value=2**40)
counts = st.integers(min_value=1, max_value=2**62)
seconds = st.floats(min_value=1e-3, max_value=1e6)
fractions = st.floats(min_value=1e-3, max_value=1024)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "fuel": counts, "memory": sizes, "timeout": seconds, "output_bytes": sizes,
    "stdout_bytes": sizes, "cpus": fractions, "pids": st.integers(min_value=1, max_value=2**31),
}


def test_every_resources_field_is_clamped() -> None:
    assert set(Resources.model_fields) == set(CLAMPS) == set(FIELD_VALUES)


def test_the_service_accepts_exactly_the_resources_fields() -> None:
    from wasmbox.service.schemas import ResourcesRequest

    assert set(ResourcesRequest.model_fields) == set(Resources.model_fields)


@given(data=st.data())
def test_every_resources_field_is_clamped_to_its_policy_maximum(data: st.DataObject) -> None:
    maxima = {name: data.draw(values, label=f"max {name}") for name, values in
              FIELD_VALUES.items()}
    requests = {name: data.draw(st.none() | values, label=f"request {name}") for name, values
                in FIELD_VALUES.items()}
    total = maxima["output_bytes"]
    policy = Policy(
        limits=Limits(fuel=maxima["fuel"], memory=maxima["memory"],
                      stdout_bytes=maxima["stdout_bytes"], cpus=maxima["cpus"],
                      pids=maxima["pids"]),
        timeouts=TimeoutPolicy(run=maxima["timeout"]),
        output=OutputPolicy(max_total_bytes=total, max_file_bytes=min(total, 8 << 20)),
    )
    task = Task.wasm(MODULE, resources=Resources(**{k: v for k, v in requests.items()
                                                    if v is not None}))
    plan = apply(policy, task)
    for name, (maximum_of, planned) in CLAMPS.items():
        maximum, got, wanted = maximum_of(policy), planned(plan), requests[name]
        assert maximum is not None and got is not None
        assert got <= maximum, name
        assert got == (maximum if wanted is None else min(wanted, maximum)), name
    assert plan.output.max_file_bytes <= plan.output.max_total_bytes


@given(fuel=counts, timeout=seconds)
def test_an_explicitly_unbounded_maximum_keeps_the_request(fuel: int, timeout: float) -> None:
    policy = Policy(allow_unbounded=True, limits=Limits(fuel=None),
                    timeouts=TimeoutPolicy(run=None))
    plan = apply(policy, Task.wasm(MODULE, resources=Resources(fuel=fuel, timeout=timeout)))
    assert (plan.fuel, plan.timeout) == (fuel, timeout)
    unset = apply(policy, Task.wasm(MODULE))
    assert (unset.fuel, unset.timeout) == (None, None)


def test_limits_a_task_cannot_request_come_from_the_policy() -> None:
    limits = Limits(stderr_bytes=1234, stack=256 << 10, input_bytes=99, tmpfs=4096,
                    table_elements=7, instances=2)
    plan = apply(Policy(limits=limits), Task.wasm(MODULE))
    assert (plan.stderr_bytes, plan.stack, plan.input_bytes, plan.tmpfs, plan.table_elements,
            plan.instances) == (1234, 256 << 10, 99, 4096, 7, 2)


# --- network access, capabilities (issue 13) -----------------------------------------------

from wasmbox.errors import ConfigError  # noqa: E402
from wasmbox.models import Endpoint  # noqa: E402


@pytest.mark.parametrize(("text", "network", "name", "port"), [
    ("127.0.0.1:8080", "127.0.0.1/32", None, 8080),
    ("10.0.0.0/8", "10.0.0.0/8", None, None),
    ("192.0.2.7", "192.0.2.7/32", None, None),
    ("db.example.com:5432", None, "db.example.com", 5432),
    ("[2001:db8::1]:443", "2001:db8::1/128", None, 443),
    ("2001:db8::/32", "2001:db8::/32", None, None),
])
def test_endpoints_parse(text: str, network: str | None, name: str | None,
                         port: int | None) -> None:
    ep = Endpoint.parse(text)
    assert (ep.network, ep.name, ep.port) == (network, name, port)


@pytest.mark.parametrize(("text", "why"), [
    ("example.com", "without a port"),
    ("1.2.3.4:0", "1..65535"),
    ("1.2.3.4:70000", "1..65535"),
    ("10.0.0.1/8", "host bits"),
    ("[::1", "brackets"),
    ("[nope]:80", "not an IPv6"),
    ("a b:80", "not an ip"),
    ("999.1.1.1:80", "not an ip"),
    (" 1.2.3.4", "not a host"),
])
def test_bad_endpoints_are_config_errors_at_load(text: str, why: str) -> None:
    toml = f'[network]\noutbound = true\nallowed_endpoints = ["{text}"]\n'
    with pytest.raises(ConfigError, match="allowed_endpoints") as info:
        Policy.from_toml_text(toml)
    assert why in str(info.value)


def test_enabled_is_a_deprecated_alias_of_outbound() -> None:
    assert Policy.from_toml_text("[network]\nenabled = true\n").network.outbound is True
    assert NetworkPolicy(enabled=True).enabled is True
    with pytest.raises(ConfigError, match="disagree"):
        Policy.from_toml_text("[network]\nenabled = true\noutbound = false\n")


def test_a_task_network_request_is_clamped_to_the_policy() -> None:
    policy = Policy(network=NetworkPolicy(
        outbound=True, allowed_endpoints=["127.0.0.1:80", "10.0.0.0/8", "api.test:443"],
        allowed_ports=[443, 8443]))
    plan = apply(policy, Task.command(["true"], network=["10.1.2.3:8443", "api.test:443"]))
    assert plan.network is not None
    assert [e.text for e in plan.network.endpoints] == ["10.1.2.3:8443", "api.test:443"]
    for beyond in ("10.1.2.3:22", "11.0.0.1:443", "127.0.0.1:81", "api.test:80",
                   "other.test:443", "10.0.0.0/7"):
        with pytest.raises(PolicyViolation, match=beyond) as info:
            apply(policy, Task.command(["true"], network=[beyond]))
        assert info.value.rule == "network.allowed_endpoints"
    assert apply(policy, Task.command(["true"])).network is None
    everything = apply(policy, Task.command(["true"], network=True)).network
    assert everything is not None and len(everything.endpoints) == 3


def test_dns_uses_the_one_resolver() -> None:
    policy = Policy(network=NetworkPolicy(outbound=True, dns=True, resolver="127.0.0.1:5353"))
    plan = apply(policy, Task.command(["true"], network=True))
    assert plan.network is not None and plan.network.resolver == ("127.0.0.1", 5353)
    off = Policy(network=NetworkPolicy(outbound=True, resolver="127.0.0.1:5353"))
    plan = apply(off, Task.command(["true"], network=True))
    assert plan.network is not None and plan.network.resolver is None
    with pytest.raises(ConfigError, match="resolver"):
        Policy.from_toml_text('[network]\nresolver = "10.0.0.0/8"\n')


def test_capabilities_are_validated_and_granted_only_within_the_policy() -> None:
    with pytest.raises(ConfigError, match="did you mean CAP_NET_RAW"):
        Policy.from_toml_text('capabilities = ["CAP_NET_RAWW"]\n')
    with pytest.raises(Exception, match="not a capability"):
        Task.command(["true"], capabilities=["NET_RAW"])
    policy = Policy(capabilities=frozenset({"CAP_NET_BIND_SERVICE"}))
    assert apply(policy, Task.command(["true"])).capabilities == frozenset()
    granted = apply(policy, Task.command(["true"], capabilities=["CAP_NET_BIND_SERVICE"]))
    assert granted.capabilities == {"CAP_NET_BIND_SERVICE"}
    with pytest.raises(PolicyViolation, match="CAP_SYS_ADMIN") as info:
        apply(policy, Task.command(["true"], capabilities=["CAP_SYS_ADMIN"]))
    assert info.value.rule == "capabilities"


# `disk` joins the clamp tables above. The hypothesis test's policies set no [limits] disk
# (unbounded: the request applies as is), and its requests stay above every output cap
# drawn there, so the other fields' expectations hold; disk's own clamping is tested here
# and in tests/container/test_disk.py.
_NO_DISK_CAP = 2**62
CLAMPS["disk"] = (lambda p: p.limits.disk if p.limits.disk is not None else _NO_DISK_CAP,
                  lambda plan: plan.disk if plan.disk is not None else _NO_DISK_CAP)
FIELD_VALUES["disk"] = st.integers(min_value=2**41, max_value=2**42)


@given(maximum=sizes, request=st.none() | sizes)
def test_disk_is_clamped_and_caps_tmp_and_outputs(maximum: int, request: int | None) -> None:
    policy = Policy(limits=Limits(disk=maximum))
    plan = apply(policy, Task.command(["true"], resources=Resources(disk=request)))
    expected = maximum if request is None else min(request, maximum)
    assert plan.disk == expected
    assert plan.tmpfs == min(Limits().tmpfs, expected)
    assert plan.output.max_total_bytes == min(OutputPolicy().max_total_bytes, expected)
    assert plan.output.max_file_bytes <= plan.output.max_total_bytes
