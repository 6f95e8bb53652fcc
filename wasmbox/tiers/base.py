"""The protocol every tier implements, and how the sandbox finds tiers without knowing them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

from wasmbox.errors import TierDeclined
from wasmbox.lifecycle import Deadline
from wasmbox.models import Status, TaskKind, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan
from wasmbox.workspace import Workspace


@dataclass(frozen=True)
class Availability:
    """Whether a tier can run here and, when it cannot, why."""

    tier: TierName
    ok: bool
    reason: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a tier reports about one run: status, exit code, metrics. Streams and outputs
    stay in the workspace; the sandbox reads them with the `Result`."""

    status: Status
    exit_code: int | None = None
    trap: str | None = None
    reason: str | None = None
    startup_s: float = 0.0
    run_s: float = 0.0
    cpu_s: float | None = None
    fuel_consumed: int | None = None
    peak_memory_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TierCapabilities:
    """What a tier can give a task, as data: checked in one place (`check_capabilities`)."""

    kinds: frozenset[TaskKind]
    network: bool = False
    capabilities: bool = False
    hidden_paths: bool = False
    mounts: bool = True
    note: str = ""  # appended to every refusal (what would serve it instead)


def check_capabilities(tier: TierName, offers: TierCapabilities, plan: Plan) -> None:
    """Raise `TierDeclined` naming the first thing `plan` asks that `offers` lacks.

    One message shape per fact, whichever tier declines it; ``tier="auto"`` escalates past
    a declining tier, an explicit tier raises.
    """
    refusal = _refusal(tier, offers, plan)
    if refusal is not None:
        rule, message = refusal
        raise TierDeclined(str(tier), rule, f"{message} {offers.note}".strip())


def _refusal(tier: TierName, offers: TierCapabilities, plan: Plan) -> tuple[str, str] | None:
    kind = plan.task.kind
    if kind not in offers.kinds:
        return "tier", f"the {tier} tier cannot run {kind} tasks"
    if plan.network is not None and not offers.network:
        return "network.enabled", f"the {tier} tier gives tasks no network"
    if plan.capabilities and not offers.capabilities:
        return "capabilities", f"the {tier} tier cannot grant capabilities"
    if plan.hidden_paths and not offers.hidden_paths:
        return "filesystem.hidden", f"the {tier} tier cannot hide {plan.hidden_paths[0]}"
    if (plan.readonly_mounts or plan.writable_mounts) and not offers.mounts:
        return "filesystem", f"the {tier} tier cannot grant extra mounts"
    return None


class Prepared(Protocol):
    """What `Tier.prepare` hands `Tier.run`: tier-specific, frozen, and carrying its plan."""

    @property
    def plan(self) -> Plan:
        """The plan this was prepared for (possibly re-targeted to this tier)."""
        ...


P = TypeVar("P", bound=Prepared)


@runtime_checkable
class TierOf(Protocol[P]):
    """A way to run a `Plan` in isolation. Implementations own their native resources.

    The contract is the pattern of wasmtime's ``InstancePre``: `prepare` does everything a
    plan needs once (checks, compiling, hashing, pool warm-up) and returns it; `run` only
    runs. Tiers leave stdout, stderr and outputs in the workspace; the sandbox reads, caps
    and filters them once.
    """

    name: TierName
    capabilities: TierCapabilities

    def availability(self) -> Availability:
        """Probe the host; never raises."""
        ...

    def prepare(self, plan: Plan) -> P:
        """Get ready to run `plan` (compile, build, cache) before its deadline starts.

        Cheap once done; raises `TierDeclined` (via `check_capabilities`) or
        `TierUnavailable` for a plan this tier cannot serve, and what a bad task deserves
        (`ModuleRejected`, `PolicyViolation`), so no workspace is made for it.
        """
        ...

    def unsuitable(self, prepared: P) -> str | None:
        """Why this tier should not take a prepared plan when the task asked for ``auto``
        (a Python import the interpreter lacks), or None; asked once, by the sandbox."""
        ...

    def run(
        self, prepared: P, workspace: Workspace, deadline: Deadline, monitor: Monitor
    ) -> Outcome:
        """Run the prepared task with its input staged in `workspace`, bounded by `deadline`.

        While it runs, the tier feeds `monitor` a `Sample` whenever `monitor.due()`, and stops
        the task with Status.ANOMALY when `monitor.observe` returns a reason.

        Guest faults are reported as an `Outcome` status; host failures raise `SandboxError`.
        Every resource the run creates is released before this returns, on every path.
        """
        ...

    def close(self) -> None:
        """Release engines, caches, pools. Idempotent."""
        ...


Tier: TypeAlias = "TierOf[Any]"  # any tier, whatever its Prepared type

# Tiers are imported only when first used, so a host without crun never loads that code.
_TIER_FACTORIES: dict[TierName, str] = {
    TierName.WASM: "wasmbox.tiers.wasm:WasmTier",
    TierName.CONTAINER: "wasmbox.tiers.container:ContainerTier",
    TierName.VM: "wasmbox.tiers.vm:VmTier",
}


def tier_factory(name: TierName) -> Callable[..., Tier]:
    """The constructor of a built-in tier (it takes ``config=HostConfig``); raises
    `ModuleNotFoundError` if that tier is not built in."""
    module, _, attr = _TIER_FACTORIES[name].partition(":")
    factory: Callable[..., Tier] = getattr(importlib.import_module(module), attr)
    return factory
