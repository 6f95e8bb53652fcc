"""The facade: policy, tier choice, workspace, cleanup. Knows tiers only through `tiers.base`."""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from wasmbox import telemetry
from wasmbox._batch import Batching, Cancel
from wasmbox._config import HostConfig
from wasmbox._results import assemble, check_task_json, collect
from wasmbox.errors import ConfigError, PolicyViolation, TierUnavailable
from wasmbox.lifecycle import Deadline, shielded
from wasmbox.models import ISOLATION_ORDER, Policy, Result, Status, Task, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan, apply
from wasmbox.tiers.base import Availability, Prepared, Tier, tier_factory
from wasmbox.workspace import Workspace, reclaim_stale

if TYPE_CHECKING:
    from wasmbox.procpool import ProcessPool

class Sandbox(Batching):
    """Runs tasks under one policy. Owns every tier's engines, caches and pools.

    Thread-safe: `run` may be called from many threads at once; `map` does exactly that.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        workspace_root: Path | None = None,
        tiers: Mapping[TierName, Tier | Callable[[], Tier]] | None = None,
        config: HostConfig | None = None,
    ) -> None:
        """`config` is read from the environment when not given (`workspace_root` overrides
        its root) and handed to the built-in tiers. `tiers` maps a tier to a factory (called
        once, when first needed; the sandbox closes what it makes) or to a tier instance
        (used as is and never closed here: its owner closes it)."""
        self.policy = policy or Policy()
        self.config = (config or HostConfig.from_env()).with_workspace_root(workspace_root)
        self._workspace_root = workspace_root
        self._factories: dict[TierName, Callable[[], Tier]] = {}
        self._borrowed: dict[TierName, Tier] = {}
        for name, entry in (tiers or {}).items():
            if _is_instance(entry):
                self._borrowed[name] = cast(Tier, entry)
            else:
                self._factories[name] = cast(Callable[[], Tier], entry)
        self._tiers: dict[TierName, Tier] = dict(self._borrowed)
        self._availability: dict[TierName, Availability] = {}
        self._cancels: dict[str, set[Cancel]] = {}
        self._pools: dict[int, ProcessPool] = {}
        self._lock = threading.Lock()
        _reclaim_once(self.config.workspace_root)
        _LIVE.add(self)
        telemetry.LIVE_SANDBOXES.inc()

    def run(self, task: Task) -> Result:
        """Run one task to completion and return its `Result`.

        Raises `PolicyViolation`, `InputRejected`, `ModuleRejected` for a task the host must
        not run, and `TierUnavailable` when no allowed tier can run it here. Guest faults
        (timeouts, traps, floods) come back as statuses.
        """
        return self._run(task, Cancel())

    def _run_registered(self, task: Task, token: Cancel) -> Result:
        t0 = time.perf_counter()
        plan = apply(self.policy, task)
        data = check_task_json(plan)  # hostile schemas and inputs go before any tier work
        # One-off costs (checks, compiling, building) are prepared before the deadline.
        tier, prepared, escalated_from, why = self._choose(plan)
        plan = prepared.plan
        if escalated_from is not None:
            log.info("task %s escalated from %s to %s: %s", task.id, escalated_from,
                     tier.name, why)
        deadline = token.attach(Deadline(plan.timeout))
        monitor = Monitor(plan.policy.monitor)
        workspace = Workspace(plan, self.config.workspace_root, data=data)
        running = telemetry.RUNNING.labels(plan.tier.value)
        running.inc()
        try:
            outcome = tier.run(prepared, workspace, deadline, monitor)
            if deadline.cancelled and outcome.status is not Status.COMPLETED:
                outcome.status, outcome.exit_code = Status.CANCELLED, None
                outcome.reason = "cancelled by the caller"
            collected = collect(plan, workspace, outcome)
        finally:
            running.dec()
            t_cleanup = time.perf_counter()
            with shielded():
                workspace.close()
        update: dict[str, object] = {}
        if escalated_from is not None:
            update.update(escalated_from=escalated_from, escalation_reason=why)
        if plan.warnings:
            update["warnings"] = plan.warnings
        t_end = time.perf_counter()
        result = assemble(
            plan, outcome, collected, monitor,
            cleanup_s=t_end - t_cleanup, wall_s=t_end - t0, update=update,
        )
        telemetry.record(result)
        return result

    def availability(self, name: TierName) -> Availability:
        """Whether `name` can run here, probed once and remembered."""
        found = self._availability.get(name)
        if found is not None:
            return found
        try:
            tier = self._tier(name)
        except TierUnavailable as exc:
            found = Availability(name, False, exc.reason)
        else:
            found = tier.availability()
        self._availability[name] = found
        return found

    def doctor(self) -> list[Availability]:
        """Availability of every tier, lightest first."""
        return [self.availability(name) for name in ISOLATION_ORDER]

    def _choose(self, plan: Plan) -> tuple[Tier, Prepared, TierName | None, str | None]:
        """The plan's tier, prepared, or for ``auto`` tasks the next heavier one the policy
        allows that can take it.

        A tier is passed over when it cannot run here, declines the plan (`prepare` raises
        `TierUnavailable`: a capability it lacks) or cannot run this task (`unsuitable`: a
        Python import the wasm interpreter lacks). Isolation only ever goes up: a lighter
        tier is never used instead. Returns the tier, its prepared plan, the tier escalated
        from, and why.
        """
        auto = plan.task.tier is TierName.AUTO
        candidates = [plan.tier]
        if auto:
            heavier = ISOLATION_ORDER[ISOLATION_ORDER.index(plan.tier) + 1:]
            candidates += [t for t in heavier if t in self.policy.allowed_tiers]
        reasons = []
        for name in candidates:
            available = self._availability.get(name) or self.availability(name)
            if not available.ok:
                reasons.append(f"{name}: {available.reason}")
                continue
            try:
                candidate = plan if name is plan.tier else plan.on_tier(name)
            except PolicyViolation as exc:
                reasons.append(f"{name}: {exc}")
                continue
            tier = self._tier(name)
            if not auto:
                return tier, tier.prepare(candidate), None, None
            try:
                prepared = tier.prepare(candidate)
            except TierUnavailable as exc:
                reasons.append(f"{name}: {exc.reason}")
                continue
            unsuitable = tier.unsuitable(prepared)
            if unsuitable is not None:
                reasons.append(f"{name}: {unsuitable}")
                continue
            if name is plan.tier:
                return tier, prepared, None, None
            return tier, prepared, plan.tier, "; ".join(reasons)
        if auto:
            barred = [t for t in ISOLATION_ORDER[ISOLATION_ORDER.index(plan.tier) + 1:]
                      if t not in self.policy.allowed_tiers]
            if barred:
                allowed = ", ".join(t for t in ISOLATION_ORDER if t in self.policy.allowed_tiers)
                raise TierUnavailable(
                    str(plan.tier),
                    f"the policy allows only {allowed}, which cannot run this task ("
                    + "; ".join(reasons) + f"); {', '.join(barred)} would need the policy's "
                    "allowed_tiers to include it",
                    declined_by_policy=True,
                )
        raise TierUnavailable(str(plan.tier), "; ".join(reasons))

    def _tier(self, name: TierName) -> Tier:
        tier = self._tiers.get(name)
        if tier is not None:
            return tier
        with self._lock:
            self._ensure_open()
            tier = self._tiers.get(name)
            if tier is None:
                factory = self._factories.get(name)
                if factory is None:
                    try:
                        builtin = tier_factory(name)
                    except (ImportError, AttributeError) as exc:
                        raise TierUnavailable(str(name), f"not built in ({exc})") from exc
                    tier = builtin(config=self.config)
                else:
                    tier = factory()
                self._tiers[name] = tier
        return tier

    def _process_pool(self, processes: int) -> ProcessPool:
        from wasmbox.procpool import ProcessPool

        if self._borrowed:
            raise ConfigError("processes= needs tier factories (they are pickled to the "
                              "workers), not tier instances")
        with self._lock:
            self._ensure_open()
            pool = self._pools.get(processes)
            if pool is None:
                pool = ProcessPool(self.policy, processes=processes,
                                   workspace_root=self._workspace_root, tiers=self._factories)
                self._pools[processes] = pool
        return pool

    def _release(self) -> None:
        telemetry.LIVE_SANDBOXES.dec()
        with self._lock:
            tiers, self._tiers = self._tiers, {}
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            with shielded():
                pool.close()
        for name, tier in tiers.items():
            if self._borrowed.get(name) is not tier:
                tier.close()


log = logging.getLogger("wasmbox")
_RECLAIMED: set[Path] = set()
# Sandboxes still open at interpreter exit are closed then: native handles (engines, stores,
# runtimes) dropped during interpreter teardown can make wasmtime's runtime panic.
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_live_sandboxes() -> None:
    for sandbox in list(_LIVE):
        sandbox.close()


def _is_instance(entry: Tier | Callable[[], Tier]) -> bool:
    """A tier instance, not a factory (a class or a callable that makes one)."""
    return not isinstance(entry, type) and hasattr(entry, "prepare") and hasattr(entry, "run")


def _reclaim_once(root: Path) -> None:
    # Workspaces of killed processes are reclaimed the first time a sandbox uses their root.
    if root not in _RECLAIMED:
        _RECLAIMED.add(root)
        reclaim_stale(root)


