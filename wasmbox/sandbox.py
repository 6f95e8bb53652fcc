"""The facade: policy, tier choice, workspace, cleanup. Knows tiers only through `tiers.base`."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wasmbox import telemetry
from wasmbox.errors import PolicyViolation, TierUnavailable
from wasmbox.lifecycle import Closeable, Deadline, shielded
from wasmbox.models import ISOLATION_ORDER, Metrics, Policy, Result, Status, Task, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan, apply
from wasmbox.tiers.base import Availability, Outcome, Tier, tier_factory
from wasmbox.validation import compile_schema
from wasmbox.workspace import (
    Collected,
    Workspace,
    encode_input,
    filter_stream,
    reclaim_stale,
    redact_text,
)

# Statuses after which outputs are still collected and checked (the guest ran to its end).
_COLLECTED = (Status.COMPLETED, Status.FAILED)


class Sandbox(Closeable):
    """Runs tasks under one policy. Owns every tier's engines, caches and pools.

    Thread-safe: `run` may be called from many threads at once; `map` does exactly that.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        workspace_root: Path | None = None,
        tiers: dict[TierName, Callable[[], Tier]] | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self._workspace_root = workspace_root
        self._factories = dict(tiers or {})
        self._tiers: dict[TierName, Tier] = {}
        self._availability: dict[TierName, Availability] = {}
        self._lock = threading.Lock()
        _reclaim_once(workspace_root)
        _LIVE.add(self)
        telemetry.LIVE_SANDBOXES.inc()

    def run(self, task: Task) -> Result:
        """Run one task to completion and return its `Result`.

        Raises `PolicyViolation`, `InputRejected`, `ModuleRejected` for a task the host must
        not run, and `TierUnavailable` when no allowed tier can run it here. Guest faults
        (timeouts, traps, floods) come back as statuses.
        """
        self._ensure_open()
        t0 = time.perf_counter()
        plan = apply(self.policy, task)
        data = _check_task_json(plan)  # hostile schemas and inputs go before any tier work
        tier, escalated_from, why = self._choose(plan)
        if escalated_from is not None:
            plan = plan.on_tier(tier.name)
            log.info("task %s escalated from %s to %s: %s", task.id, escalated_from,
                     tier.name, why)
        tier.prepare(plan)  # one-off costs (compiling, building) are not the task's time
        deadline = Deadline(plan.timeout)
        monitor = Monitor(plan.policy.monitor)
        workspace = Workspace(plan, self._workspace_root, data=data)
        running = telemetry.RUNNING.labels(plan.tier.value)
        running.inc()
        try:
            outcome = tier.run(plan, workspace, deadline, monitor)
            collected = _collect(plan, workspace, outcome)
        finally:
            running.dec()
            t_cleanup = time.perf_counter()
            with shielded():
                workspace.close()
        t_end = time.perf_counter()
        result = _assemble(
            plan, outcome, collected, monitor,
            cleanup_s=t_end - t_cleanup, wall_s=t_end - t0,
        )
        if escalated_from is not None:
            result = result.model_copy(
                update={"escalated_from": escalated_from, "escalation_reason": why}
            )
        telemetry.record(result)
        return result

    def map(self, tasks: Iterable[Task], concurrency: int = 1) -> list[Result]:
        """Run many tasks on `concurrency` threads; results keep the order of `tasks`."""
        self._ensure_open()
        items = list(tasks)
        if concurrency <= 1:
            return [self.run(t) for t in items]
        with ThreadPoolExecutor(concurrency, thread_name_prefix="wasmbox-run") as pool:
            return list(pool.map(self.run, items))

    async def arun(self, task: Task) -> Result:
        """`run` for asyncio: the task runs on a worker thread."""
        return await asyncio.to_thread(self.run, task)

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

    def _choose(self, plan: Plan) -> tuple[Tier, TierName | None, str | None]:
        """The plan's tier or, for ``auto`` tasks, the next heavier one the policy allows.

        A tier is passed over when it cannot run here or cannot run this task (a Python
        import the wasm interpreter lacks). Isolation only ever goes up: a lighter tier is
        never used instead. Returns the tier, the tier escalated from, and why.
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
            if name is not plan.tier:
                try:
                    plan.on_tier(name)
                except PolicyViolation as exc:
                    reasons.append(f"{name}: {exc}")
                    continue
            tier = self._tier(name)
            unsuitable = tier.unsuitable(plan) if auto else None
            if unsuitable is not None:
                reasons.append(f"{name}: {unsuitable}")
                continue
            if name is plan.tier:
                return tier, None, None
            return tier, plan.tier, "; ".join(reasons)
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
                        factory = tier_factory(name)
                    except (ImportError, AttributeError) as exc:
                        raise TierUnavailable(str(name), f"not built in ({exc})") from exc
                tier = factory()
                self._tiers[name] = tier
        return tier

    def _release(self) -> None:
        telemetry.LIVE_SANDBOXES.dec()
        with self._lock:
            tiers, self._tiers = self._tiers, {}
        for tier in tiers.values():
            tier.close()


log = logging.getLogger("wasmbox")
_RECLAIMED: set[Path | None] = set()
# Sandboxes still open at interpreter exit are closed then: native handles (engines, stores,
# runtimes) dropped during interpreter teardown can make wasmtime's runtime panic.
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_live_sandboxes() -> None:
    for sandbox in list(_LIVE):
        sandbox.close()


def _reclaim_once(root: Path | None) -> None:
    # Workspaces of killed processes are reclaimed the first time a sandbox uses their root.
    if root not in _RECLAIMED:
        _RECLAIMED.add(root)
        reclaim_stale(root)


def _check_task_json(plan: Plan) -> bytes:
    """Compile the task's schemas and encode its input, or raise `InputRejected`."""
    task = plan.task
    if task.input_schema is not None:
        compile_schema(task.input_schema, what="input_schema")
    if task.output_schema is not None:
        compile_schema(task.output_schema, what="output_schema")
    return encode_input(plan)


def _collect(plan: Plan, workspace: Workspace, outcome: Outcome) -> Collected:
    """Outputs of a run that reached its end, and the stream filter's verdict.

    Streams are filtered whatever the status (a guest that leaks a secret and then loops
    must not get it out through a TIMEOUT); a rejected stream comes back redacted.
    """
    collected = Collected()
    if outcome.status in _COLLECTED:
        collected = workspace.collect()
    for name in ("stdout", "stderr"):
        data, rejection = filter_stream(getattr(outcome, name), plan.output, name)
        setattr(outcome, name, data)
        if rejection and collected.rejection is None and outcome.status in _COLLECTED:
            collected = Collected(rejection=rejection)
    return collected


def _assemble(
    plan: Plan,
    outcome: Outcome,
    collected: Collected,
    monitor: Monitor,
    *,
    cleanup_s: float,
    wall_s: float,
) -> Result:
    status, reason = outcome.status, outcome.reason
    if collected.rejection is not None:
        status, reason = Status.OUTPUT_REJECTED, collected.rejection
    if reason is not None:  # reasons quote guest text (exceptions, schema messages)
        reason = redact_text(reason, plan.output)
    # Everything below is produced by our own code: skip re-validation on the hot path.
    metrics = Metrics.model_construct(
        startup_s=outcome.startup_s,
        run_s=outcome.run_s,
        cleanup_s=cleanup_s,
        wall_s=wall_s,
        cpu_s=outcome.cpu_s,
        fuel_consumed=outcome.fuel_consumed,
        peak_memory_bytes=outcome.peak_memory_bytes,
        stdout_bytes=len(outcome.stdout),
        stderr_bytes=len(outcome.stderr),
        output_bytes=collected.total_bytes,
        output_files=len(collected.files),
        extra=outcome.extra,
    )
    return Result.model_construct(
        task_id=plan.task.id,
        run_id=uuid.uuid4().hex,
        tier=plan.tier,
        status=status,
        exit_code=outcome.exit_code,
        trap=outcome.trap,
        reason=reason,
        output=collected.output if collected.rejection is None else None,
        files=collected.files if collected.rejection is None else {},
        stdout=outcome.stdout.decode("utf-8", "replace"),
        stderr=outcome.stderr.decode("utf-8", "replace"),
        stdout_truncated=outcome.stdout_truncated,
        stderr_truncated=outcome.stderr_truncated,
        metrics=metrics,
        events=tuple(monitor.events),
    )
