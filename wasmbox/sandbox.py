"""The facade: policy, tier choice, workspace, cleanup. Knows tiers only through `tiers.base`."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, overload

from wasmbox import telemetry
from wasmbox._config import HostConfig
from wasmbox.errors import ConfigError, PolicyViolation, SandboxError, TierUnavailable
from wasmbox.lifecycle import Closeable, Deadline, shielded
from wasmbox.models import ISOLATION_ORDER, Metrics, Policy, Result, Status, Task, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan, apply
from wasmbox.tiers.base import Availability, Outcome, Prepared, Tier, tier_factory
from wasmbox.validation import compile_schema

if TYPE_CHECKING:
    from wasmbox.procpool import ProcessPool
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
        self._cancels: dict[str, set[_Cancel]] = {}
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
        return self._run(task, _Cancel())

    def cancel(self, task_id: str) -> bool:
        """Stop every running (or about to run) task with this id: its guest is stopped as on
        a timeout, everything is freed, and its result says `Status.CANCELLED`. True when a
        run was found. Thread-safe; `arun` calls it when its asyncio task is cancelled."""
        with self._lock:
            tokens = list(self._cancels.get(task_id, ()))
        for token in tokens:
            token.cancel()
        return bool(tokens)

    def _run(self, task: Task, token: _Cancel) -> Result:
        self._ensure_open()
        with self._lock:
            self._cancels.setdefault(task.id, set()).add(token)
        try:
            return self._run_registered(task, token)
        finally:
            with self._lock:
                tokens = self._cancels.get(task.id)
                if tokens is not None:
                    tokens.discard(token)
                    if not tokens:
                        del self._cancels[task.id]

    def _run_registered(self, task: Task, token: _Cancel) -> Result:
        t0 = time.perf_counter()
        plan = apply(self.policy, task)
        data = _check_task_json(plan)  # hostile schemas and inputs go before any tier work
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
        update: dict[str, object] = {}
        if escalated_from is not None:
            update.update(escalated_from=escalated_from, escalation_reason=why)
        if plan.warnings:
            update["warnings"] = plan.warnings
        if update:
            result = result.model_copy(update=update)
        telemetry.record(result)
        return result

    @overload
    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: Literal[False] = False,
            processes: int | None = None) -> list[Result]: ...

    @overload
    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: Literal[True],
            processes: int | None = None) -> list[Result | SandboxError]: ...

    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: bool = False,
            processes: int | None = None) -> list[Result] | list[Result | SandboxError]:
        """Run many tasks on `concurrency` threads; results keep the order of `tasks`.

        A task the host refuses (`PolicyViolation`, `InputRejected`, ...) raises, as `run`
        does, after every other task has finished; with ``return_exceptions=True`` its error
        takes its place in the list instead, and no result is lost.

        ``processes=N`` runs the batch on N spawned worker processes instead (each with its
        own warm sandbox and this policy), which scales short tasks past the GIL; the pool
        is kept for later calls and closed with the sandbox. Tier factories must pickle.
        """
        if processes is not None and processes > 0:
            pool = self._process_pool(processes)
            if return_exceptions:
                return pool.map(tasks, return_exceptions=True)
            return pool.map(tasks)
        out = [item for _, item in self.imap(tasks, concurrency, return_exceptions=True)]
        if not return_exceptions:
            for item in out:
                if isinstance(item, SandboxError):
                    raise item
            return [item for item in out if isinstance(item, Result)]
        return out

    def imap(self, tasks: Iterable[Task], concurrency: int = 1, *, ordered: bool = True,
             return_exceptions: bool = False) -> Iterator[tuple[int, Result | SandboxError]]:
        """Yield ``(index, result)`` as tasks finish, for batches too large to hold.

        At most ``2 * concurrency`` tasks are taken from `tasks` ahead of the results, so
        an endless generator works. ``ordered=True`` yields in input order; ``False`` as
        each completes. A refused task raises where it is yielded, or is yielded as its
        `SandboxError` with ``return_exceptions=True``.
        """
        self._ensure_open()
        workers = max(1, concurrency)
        source = enumerate(tasks)
        if workers == 1:  # in the caller's thread, one at a time
            for index, task in source:
                try:
                    yield index, self.run(task)
                except SandboxError as exc:
                    if not return_exceptions:
                        raise
                    yield index, exc
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="wasmbox-run") as pool:
            pending: dict[Future[Result], int] = {}
            switches: dict[Future[Result], _Cancel] = {}
            done_early: dict[int, Future[Result]] = {}
            next_index = 0

            def fill() -> None:
                room = 2 * workers - len(pending) - len(done_early)
                for index, task in itertools.islice(source, max(0, room)):
                    token = _Cancel()
                    future = pool.submit(self._run, task, token)
                    pending[future], switches[future] = index, token

            def unwrap(index: int, future: Future[Result]) -> tuple[int, Result | SandboxError]:
                exc = future.exception()
                if exc is None:
                    return index, future.result()
                if return_exceptions and isinstance(exc, SandboxError):
                    return index, exc
                raise exc

            try:
                fill()
                while pending or done_early:
                    if ordered and next_index in done_early:
                        yield unwrap(next_index, done_early.pop(next_index))
                        next_index += 1
                        continue
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        index = pending.pop(future)
                        switches.pop(future, None)
                        if ordered:
                            done_early[index] = future
                        else:
                            yield unwrap(index, future)
                    fill()
            finally:  # the consumer stopped early (break, error, Ctrl-C): stop the rest
                for future in pending:
                    future.cancel()
                    switches[future].cancel()

    async def arun(self, task: Task) -> Result:
        """`run` for asyncio: the task runs on a worker thread.

        Cancelling the awaiting asyncio task stops the guest (as `cancel` does), waits until
        its resources are freed, and re-raises `CancelledError`.
        """
        token = _Cancel()
        running = asyncio.ensure_future(asyncio.to_thread(self._run, task, token))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            token.cancel()
            with contextlib.suppress(Exception):
                await running  # the guest stops within a watchdog tick; cleanup completes
            raise

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


def _check_task_json(plan: Plan) -> bytes:
    """Compile the task's schemas and encode its input, or raise `InputRejected`."""
    task = plan.task
    if task.input_schema is not None:
        compile_schema(task.input_schema, what="input_schema")
    if task.output_schema is not None:
        compile_schema(task.output_schema, what="output_schema")
    return encode_input(plan)


def _collect(plan: Plan, workspace: Workspace, outcome: Outcome) -> Collected:
    """Outputs of a run that reached its end, its streams, and the filters' verdict: the
    one place a run's results are read, capped and filtered.

    Streams are filtered whatever the status (a guest that leaks a secret and then loops
    must not get it out through a TIMEOUT); a rejected stream comes back redacted.
    """
    collected = Collected()
    if outcome.status in _COLLECTED:
        collected = workspace.collect()
    streams = workspace.read_streams()
    stdout, out_rejection = filter_stream(streams.stdout, plan.output, "stdout")
    stderr, err_rejection = filter_stream(streams.stderr, plan.output, "stderr")
    rejection = out_rejection or err_rejection
    if rejection and collected.rejection is None and outcome.status in _COLLECTED:
        collected = Collected(rejection=rejection)
    collected.streams = dataclasses.replace(streams, stdout=stdout, stderr=stderr)
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
    status, reason, streams = outcome.status, outcome.reason, collected.streams
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
        stdout_bytes=len(streams.stdout),
        stderr_bytes=len(streams.stderr),
        output_bytes=collected.total_bytes,
        output_files=len(collected.files),
        net_rx_bytes=_count(outcome.extra.pop("net_rx_bytes", None)),
        net_tx_bytes=_count(outcome.extra.pop("net_tx_bytes", None)),
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
        stdout=streams.stdout.decode("utf-8", "replace"),
        stderr=streams.stderr.decode("utf-8", "replace"),
        stdout_truncated=streams.stdout_truncated,
        stderr_truncated=streams.stderr_truncated,
        metrics=metrics,
        events=tuple(monitor.events),
    )


class _Cancel:
    """One run's cancel switch; it may be thrown before the run's deadline exists."""

    __slots__ = ("_deadline", "_lock", "_thrown")

    def __init__(self) -> None:
        self._deadline: Deadline | None = None
        self._thrown = False
        self._lock = threading.Lock()

    def attach(self, deadline: Deadline) -> Deadline:
        with self._lock:
            self._deadline = deadline
            if self._thrown:
                deadline.cancel()
        return deadline

    def cancel(self) -> None:
        with self._lock:
            self._thrown = True
            if self._deadline is not None:
                self._deadline.cancel()


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)
