"""Policy application: turn a Task's requests into the effective limits a tier enforces."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from wasmbox.errors import PolicyViolation
from wasmbox.models import (
    ISOLATION_ORDER,
    Endpoint,
    OutputPolicy,
    Policy,
    Task,
    TaskKind,
    TierName,
)

N = TypeVar("N", int, float)

# Which tiers can run which kinds of code at all.
_TIERS_FOR_KIND: dict[TaskKind, tuple[TierName, ...]] = {
    TaskKind.WASM: (TierName.WASM,),
    TaskKind.PYTHON: ISOLATION_ORDER,
    TaskKind.COMMAND: (TierName.CONTAINER, TierName.VM),
}


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """What one networked task may reach: exactly these endpoints, and DNS when `resolver`
    is set (an ``(ip, port)`` the task's resolv.conf names)."""

    endpoints: tuple[Endpoint, ...]
    allowed_ports: tuple[int, ...]  # for endpoints without a port; empty: every port
    resolver: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Plan:
    """The effective, clamped limits of one run. Every field is enforced by the tier."""

    task: Task
    policy: Policy
    tier: TierName
    fuel: int | None
    memory: int
    stack: int
    timeout: float | None
    kill_grace: float
    stdout_bytes: int
    stderr_bytes: int
    input_bytes: int
    table_elements: int
    instances: int
    cpus: float
    pids: int
    tmpfs: int
    output: OutputPolicy
    args: tuple[str, ...]
    env: dict[str, str]
    allowed_imports: frozenset[str]
    network: NetworkPlan | None  # None: no network at all (only lo)
    readonly_mounts: dict[str, Path]
    writable_mounts: dict[str, Path]
    warnings: tuple[str, ...] = ()  # requests lowered to the policy's maxima, one line each
    capabilities: frozenset[str] = frozenset()  # granted (container tier only)
    hidden_paths: tuple[str, ...] = ()  # guest paths masked inside the mounts
    disk: int | None = None  # bytes the task may write (outputs and /tmp are each held to it)

    def on_tier(self, tier: TierName) -> Plan:
        """The same plan for another tier (escalation); the policy is checked again."""
        _check_tier(self.policy, self.task, tier)
        return dataclasses.replace(self, tier=tier)


def apply(policy: Policy, task: Task) -> Plan:
    """Clamp every request of `task` to `policy` and resolve its tier.

    A request above a maximum is lowered to it; what the policy forbids outright (a tier,
    network, an env name, an unpinned module) raises `PolicyViolation` naming the rule.
    An ``auto`` tier becomes the lightest allowed tier that can run the task's kind.
    """
    tier = _resolve_tier(policy, task)
    limits, req = policy.limits, task.resources
    network = _network_plan(policy, task)
    capabilities = frozenset(task.capabilities)
    denied = sorted(capabilities - policy.capabilities)
    if denied:
        raise PolicyViolation("capabilities", f"the task asks for {denied[0]}, which the "
                              "policy does not grant")
    if policy.wasi.require_sha256 and task.kind is TaskKind.WASM and task.sha256 is None:
        raise PolicyViolation("wasi.require_sha256", "the module must be pinned by sha256")
    env = _effective_env(policy, task)
    args = task.args if task.kind is TaskKind.WASM else task.argv
    size = sum(len(a.encode()) + 1 for a in args) + sum(
        len(k.encode()) + len(v.encode()) + 2 for k, v in env.items()
    )
    if size > limits.args_bytes:
        raise PolicyViolation(
            "limits.args_bytes", f"args and env take {size} bytes, over {limits.args_bytes}"
        )
    output = policy.output
    disk = clamp_optional(req.disk, limits.disk)
    for cap in (req.output_bytes, disk):
        if cap is not None and cap < output.max_total_bytes:
            output = output.model_copy(update={
                "max_total_bytes": cap,
                "max_file_bytes": min(output.max_file_bytes, cap),
            })
    return Plan(
        task=task,
        policy=policy,
        tier=tier,
        fuel=clamp_optional(req.fuel, limits.fuel),
        memory=clamp(req.memory, limits.memory),
        stack=limits.stack,
        timeout=clamp_optional(req.timeout, policy.timeouts.run),
        kill_grace=policy.timeouts.kill_grace,
        stdout_bytes=clamp(req.stdout_bytes, limits.stdout_bytes),
        stderr_bytes=limits.stderr_bytes,
        input_bytes=limits.input_bytes,
        table_elements=limits.table_elements,
        instances=limits.instances,
        cpus=clamp(req.cpus, limits.cpus),
        pids=clamp(req.pids, limits.pids),
        tmpfs=limits.tmpfs if disk is None else min(limits.tmpfs, disk),
        output=output,
        args=args,
        env=env,
        allowed_imports=policy.wasi.allowed_imports,
        network=network,
        capabilities=capabilities,
        hidden_paths=tuple(policy.filesystem.hidden),
        disk=disk,
        readonly_mounts=dict(policy.filesystem.readonly),
        writable_mounts=dict(policy.filesystem.writable),
        warnings=clamp_warnings(policy, task),
    )


def _network_plan(policy: Policy, task: Task) -> NetworkPlan | None:
    """The endpoints a task gets: all the policy allows (``network=True``) or the subset
    it lists, each of which must lie within an allowed endpoint."""
    if task.network is False or task.network == ():
        return None
    net = policy.network
    if not net.outbound:
        # The rule keeps its historical name (`enabled` is `outbound`'s deprecated alias).
        raise PolicyViolation("network.enabled", "the task asks for network access and the "
                              "policy's [network] outbound is false")
    endpoints = net.allowed_endpoints
    if not isinstance(task.network, bool):
        endpoints = tuple(Endpoint.parse(text) for text in task.network)
        for ep in endpoints:
            if not any(allowed.covers(ep, net.allowed_ports) for allowed in
                       net.allowed_endpoints):
                raise PolicyViolation("network.allowed_endpoints", f"the task asks for "
                                      f"{ep.text}, which no allowed endpoint covers")
    return NetworkPlan(endpoints, net.allowed_ports, _resolver(net.resolver) if net.dns else None)


def _resolver(configured: str | None) -> tuple[str, int]:
    """The one resolver DNS goes to: the policy's, else the host's first nameserver."""
    text = configured
    if text is None:
        try:
            with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
                lines = f.read(64 * 1024).splitlines()
        except OSError:
            lines = []
        found = [ln.split()[1] for ln in lines if ln.split()[:1] == ["nameserver"]
                 and len(ln.split()) > 1]
        if not found:
            raise PolicyViolation("network.dns", "dns is on but no resolver is set and the "
                                  "host's /etc/resolv.conf names no nameserver")
        text = found[0] if ":" not in found[0] else f"[{found[0]}]"
    ep = Endpoint.parse(text)
    assert ep.network is not None  # validated by NetworkPolicy
    return ep.network.split("/")[0], ep.port or 53


def clamp(request: N | None, maximum: N) -> N:
    """The request if within the maximum, else the maximum; unset takes the maximum."""
    return maximum if request is None else min(request, maximum)


def clamp_optional(request: N | None, maximum: N | None) -> N | None:
    """`clamp` where a None maximum is an unbounded limit the policy asked for explicitly."""
    if maximum is None:
        return request
    return clamp(request, maximum)


def _resolve_tier(policy: Policy, task: Task) -> TierName:
    if task.tier is not TierName.AUTO:
        _check_tier(policy, task, task.tier)
        return task.tier
    floor = ISOLATION_ORDER.index(policy.min_isolation)
    for tier in ISOLATION_ORDER[floor:]:
        if tier in policy.allowed_tiers and tier in _TIERS_FOR_KIND[task.kind]:
            return tier
    raise PolicyViolation(
        "allowed_tiers",
        f"no allowed tier at or above {policy.min_isolation} runs {task.kind} tasks",
    )


def _check_tier(policy: Policy, task: Task, tier: TierName) -> None:
    if tier not in _TIERS_FOR_KIND[task.kind]:
        raise PolicyViolation("tier", f"the {tier} tier cannot run {task.kind} tasks")
    if tier not in policy.allowed_tiers:
        raise PolicyViolation("allowed_tiers", f"the {tier} tier is not allowed")
    if ISOLATION_ORDER.index(tier) < ISOLATION_ORDER.index(policy.min_isolation):
        raise PolicyViolation(
            "min_isolation", f"the {tier} tier is weaker than {policy.min_isolation}"
        )
    fs = policy.filesystem
    if tier is not TierName.WASM and ("/" in fs.readonly or "/" in fs.writable):
        raise PolicyViolation(
            "filesystem", f"a mount at '/' would replace the {tier}'s root; only the wasm "
            "tier serves one"
        )


def _effective_env(policy: Policy, task: Task) -> dict[str, str]:
    for name, value in task.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise PolicyViolation("wasi.env_allow", f"invalid environment entry {name!r}")
        if not any(fnmatch.fnmatchcase(name, pat) for pat in policy.wasi.env_allow):
            raise PolicyViolation("wasi.env_allow", f"the task may not set {name}")
    if any("\0" in a for a in (*task.args, *task.argv)):
        raise PolicyViolation("limits.args_bytes", "arguments may not contain NUL")
    return {**task.env, **policy.wasi.env}


# Each request field and the policy setting that caps it, as a policy file spells it.
_CAPS: tuple[tuple[str, str, str], ...] = (
    ("fuel", "limits", "fuel"),
    ("memory", "limits", "memory"),
    ("timeout", "timeouts", "run"),
    ("stdout_bytes", "limits", "stdout_bytes"),
    ("cpus", "limits", "cpus"),
    ("pids", "limits", "pids"),
    ("output_bytes", "output", "max_total_bytes"),
    ("disk", "limits", "disk"),
)


def clamp_warnings(policy: Policy, task: Task) -> tuple[str, ...]:
    """One line per request the policy lowered: what was asked, what applies, which key."""
    if not any(value is not None for value in task.resources.__dict__.values()):
        return ()  # nothing asked (the usual task): nothing lowered
    found = []
    for field, table, key in _CAPS:
        asked = getattr(task.resources, field)
        maximum = getattr(getattr(policy, table), key)
        if asked is not None and maximum is not None and asked > maximum:
            found.append(f"resources.{field}={_show(field, asked)} is above the policy's "
                         f"[{table}] {key} = {_show(field, maximum)}; clamped to it")
    return tuple(found)


def _show(field: str, value: float) -> str:
    if field == "timeout":
        return f"{value:g}s"
    if field in ("memory", "stdout_bytes", "output_bytes", "disk"):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size:
                return f"{value / size:g}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)
