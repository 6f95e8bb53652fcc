"""The protocol every tier implements, and how the sandbox finds tiers without knowing them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from wasmbox.lifecycle import Deadline
from wasmbox.models import Status, TierName
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
    """What a tier reports about one run; the sandbox turns it into a `Result`."""

    status: Status
    exit_code: int | None = None
    trap: str | None = None
    reason: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    startup_s: float = 0.0
    run_s: float = 0.0
    cpu_s: float | None = None
    fuel_consumed: int | None = None
    peak_memory_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Tier(Protocol):
    """A way to run a `Plan` in isolation. Implementations own their native resources."""

    name: TierName

    def availability(self) -> Availability:
        """Probe the host; never raises."""
        ...

    def unsuitable(self, plan: Plan) -> str | None:
        """Why this tier should not take `plan` when the task asked for ``auto``, or None.

        The sandbox then tries the next heavier tier the policy allows.
        """
        ...

    def prepare(self, plan: Plan) -> None:
        """Get ready to run `plan` (compile, build, cache) before its deadline starts.

        Idempotent and cheap once done; raises what a bad task deserves (`ModuleRejected`,
        `PolicyViolation`) so no workspace is made for it.
        """
        ...

    def run(
        self, plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor
    ) -> Outcome:
        """Run the plan's task with its input staged in `workspace`, bounded by `deadline`.

        While it runs, the tier feeds `monitor` a `Sample` whenever `monitor.due()`, and stops
        the task with Status.ANOMALY when `monitor.observe` returns a reason.

        Guest faults are reported as an `Outcome` status; host failures raise `SandboxError`.
        Every resource the run creates is released before this returns, on every path.
        """
        ...

    def close(self) -> None:
        """Release engines, caches, pools. Idempotent."""
        ...


# Tiers are imported only when first used, so a host without crun never loads that code.
_TIER_FACTORIES: dict[TierName, str] = {
    TierName.WASM: "wasmbox.tiers.wasm:WasmTier",
    TierName.CONTAINER: "wasmbox.tiers.container:ContainerTier",
    TierName.VM: "wasmbox.tiers.vm:VmTier",
}


def tier_factory(name: TierName) -> Callable[[], Tier]:
    """The constructor of a tier; raises `ModuleNotFoundError` if that tier is not built in."""
    module, _, attr = _TIER_FACTORIES[name].partition(":")
    factory: Callable[[], Tier] = getattr(importlib.import_module(module), attr)
    return factory
