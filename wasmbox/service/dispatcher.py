"""Admission (auth-checked quotas), the durable queue and the workers that run tasks.

CPU budgets: a task is admitted only if its largest possible charge (`max_charge`, from its
clamped limits) fits in what its token has not yet spent or reserved in the window; it
reserves that much while queued and running. A task that could cost more than the whole
budget (or has no timeout) reserves all of it: it runs only alone in a clean window. When a
task ends it is charged ``max(CPU seconds, wall seconds a worker was held)`` -- a task that
sleeps still occupies a worker -- and rejected runs are charged the same way. A worker
survives anything a task or the journal throws at it: the task ends ``rejected`` with the
reason and the queue moves on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import wasmtime

from wasmbox.errors import ModuleRejected, SandboxError
from wasmbox.lifecycle import Closeable
from wasmbox.models import Policy, Result, Task, TaskKind
from wasmbox.policy import Plan, apply
from wasmbox.sandbox import Sandbox
from wasmbox.service.config import Backend, ServiceConfig
from wasmbox.service.metrics import ServiceMetrics
from wasmbox.service.store import Record, TaskStore
from wasmbox.validation import compile_schema

log = logging.getLogger("wasmbox.service")

# A task started this many times without finishing (the service died each time) is rejected.
MAX_ATTEMPTS = 3
# The retention sweep runs every quarter of the retention, within these bounds (seconds).
SWEEP_MIN_S, SWEEP_MAX_S = 0.1, 600.0


class QuotaExceeded(Exception):
    """A token is over one of its quotas; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def max_charge(plan: Plan) -> float:
    """The most a run of `plan` can be charged: every CPU busy, or a worker held, until the
    deadline plus the kill grace. Infinite for a run without a timeout."""
    if plan.timeout is None:
        return math.inf
    return plan.timeout * max(1.0, plan.cpus) + plan.kill_grace


def validate_module(data: bytes, max_bytes: int, digest: bytes | None = None) -> None:
    """Refuse bytes that are not a WebAssembly module, without compiling them.

    Raises `ModuleRejected`. Validation is linear in the size, which is bounded first; the
    tier validates again (with its own engine's features) when it runs the task. Modules that
    passed are remembered by SHA-256 (`digest`, if the caller has it already).
    """
    if len(data) > max_bytes:
        raise ModuleRejected(f"the module is {len(data)} bytes, over {max_bytes}")
    digest = digest or hashlib.sha256(data).digest()
    with _engine_lock:
        if digest in _valid:  # the same bytes validated before: the verdict cannot change
            _valid.move_to_end(digest)
            return
    try:
        wasmtime.Module.validate(_validation_engine(), data)
    except wasmtime.WasmtimeError as exc:
        lines = str(exc).strip().splitlines() or ["invalid"]
        raise ModuleRejected(f"not a valid WebAssembly module: {lines[0][:500]}") from None
    with _engine_lock:
        _valid[digest] = None
        while len(_valid) > VALID_CACHE_SIZE:
            _valid.popitem(last=False)


_engine: wasmtime.Engine | None = None
_engine_lock = threading.Lock()
# SHA-256 digests of modules that validated (most recently used last); only valid ones are
# remembered, so a hostile client cannot fill it with anything it could not already submit.
VALID_CACHE_SIZE = 1024
_valid: OrderedDict[bytes, None] = OrderedDict()


def _validation_engine() -> wasmtime.Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = wasmtime.Engine()
        return _engine


class Runner(Protocol):
    """Runs one task under a named policy somewhere (threads here, or a cluster)."""

    def run(self, policy: str, task: Task) -> Result: ...

    def cancel(self, task_id: str) -> bool: ...

    def close(self) -> None: ...


class ThreadRunner(Closeable):
    """One warm `Sandbox` per policy in this process (the GIL is released while wasm runs)."""

    def __init__(
        self,
        policies: dict[str, Policy],
        sandbox_factory: Callable[[Policy], Sandbox] = Sandbox,
    ) -> None:
        self._sandboxes = {name: sandbox_factory(p) for name, p in policies.items()}

    def run(self, policy: str, task: Task) -> Result:
        return self._sandboxes[policy].run(task)

    def cancel(self, task_id: str) -> bool:
        """Stop the task's guest now (its result says CANCELLED); False if not running."""
        found = [sandbox.cancel(task_id) for sandbox in self._sandboxes.values()]
        return any(found)

    def _release(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()


class DaskRunner(Closeable):
    """Runs tasks on a Dask cluster through `wasmbox.distributed`."""

    def __init__(self, address: str, policies: dict[str, Policy]) -> None:
        from distributed import Client

        from wasmbox.distributed import DistributedSandbox

        self._client = Client(address, timeout=30)  # type: ignore[no-untyped-call]
        self._sandboxes = {n: DistributedSandbox(self._client, p) for n, p in policies.items()}

    def run(self, policy: str, task: Task) -> Result:
        return self._sandboxes[policy].run(task)

    def cancel(self, task_id: str) -> bool:
        """A task already on a worker runs to its own deadline (it is marked cancelled)."""
        return False

    def _release(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def make_runner(
    config: ServiceConfig, sandbox_factory: Callable[[Policy], Sandbox] = Sandbox
) -> Runner:
    """The runner the configuration asks for."""
    if config.service.backend is Backend.DASK:
        assert config.service.scheduler is not None  # checked by ServiceSettings
        return DaskRunner(config.service.scheduler, config.policies)
    return ThreadRunner(config.policies, sandbox_factory)


class Dispatcher(Closeable):
    """Accepts tasks into the journal and runs them on `workers` threads.

    `on_final(task_id)` is called (from a worker thread) whenever a task reaches a final state.
    """

    def __init__(
        self,
        config: ServiceConfig,
        store: TaskStore,
        runner: Runner,
        metrics: ServiceMetrics,
        on_final: Callable[[str], None] = lambda _id: None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.on_final = on_final
        self._runner = runner
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._admission = threading.Lock()
        # Per token: tasks admitted but not yet committed, and the seconds they reserve.
        self._pending: dict[str, tuple[int, float]] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sweeper: threading.Thread | None = None
        self._running = 0
        self._running_lock = threading.Lock()
        metrics.queue_depth.set_function(lambda: len(self._queued))
        metrics.running.set_function(lambda: self._running)

    def start(self) -> int:
        """Queue every accepted-but-unfinished task from the journal, start the workers.

        Returns how many tasks were recovered.
        """
        recovered = self.store.recover(MAX_ATTEMPTS)
        for task_id in recovered:
            self._enqueue(task_id)
        for i in range(self.config.service.workers):
            thread = threading.Thread(target=self._work, name=f"wasmbox-service-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="wasmbox-service-sweep",
                                         daemon=True)
        self._sweeper.start()
        return len(recovered)

    def sweep(self) -> int:
        """Delete the tasks (and files) that finished more than ``retention`` ago; returns how
        many. Charges still inside a token's quota window are kept for its budget."""
        now = time.time()
        window = max((t.window for t in self.config.tokens.values()), default=0.0)
        settings = self.config.service
        return self.store.purge(now - settings.retention, now - window,
                                now - min(settings.module_retention, settings.retention))

    def _sweep_loop(self) -> None:
        settings = self.config.service
        shortest = min(settings.retention, settings.module_retention)
        period = min(max(shortest / 4, SWEEP_MIN_S), SWEEP_MAX_S)
        while not self._stopping.wait(period):
            try:
                deleted = self.sweep()
            except Exception:  # the next sweep tries again
                log.exception("retention sweep failed")
            else:
                if deleted:
                    log.info("retention: deleted %d finished tasks", deleted)

    def submit(
        self, token: str, policy_name: str, task: Task, module_sha256: str | None = None
    ) -> Record:
        """Check the task, the policy and the token's quotas, journal the task, queue it
        (`module_sha256`: its module's digest, when it came from the journal by digest).
        Returns its record once it is durable.

        Raises `SandboxError` for a task the policy refuses or that is malformed (a module
        that is not WebAssembly: `ModuleRejected`; text that cannot be stored:
        `InputRejected`) and `QuotaExceeded`.
        """
        return self.submit_future(token, policy_name, task, module_sha256).result()

    def submit_future(
        self, token: str, policy_name: str, task: Task, module_sha256: str | None = None
    ) -> Future[Record]:
        """`submit` without waiting for the journal: checks and admission happen now (and
        raise as `submit` does); the future gives the record once it is durable, by which
        time the task is queued.

        Raises `SandboxError` for a task the policy refuses or that is malformed (a module
        that is not WebAssembly: `ModuleRejected`; text that cannot be stored:
        `InputRejected`) and `QuotaExceeded`.
        """
        self._ensure_open()
        plan = apply(self.config.policies[policy_name], task)
        if task.kind is TaskKind.WASM and task.module_bytes is not None:
            validate_module(task.module_bytes, self.config.service.max_body_bytes,
                            None if module_sha256 is None else bytes.fromhex(module_sha256))
        # Client schemas are checked (and compiled, cached) now: a remote or file $ref, a
        # regex RE2 cannot run or an oversized schema is a 400, never a fetch on a worker.
        for what, schema in (("input_schema", task.input_schema),
                             ("output_schema", task.output_schema)):
            if schema is not None:
                compile_schema(schema, what=what)
        quota = self.config.tokens[token]
        need = max_charge(plan)
        # Check-then-reserve is atomic (the admission lock); the journal write is not under
        # it, so concurrent submissions share one commit. Until its row is committed, an
        # admitted task counts as pending here.
        with self._admission:
            count, held = self._pending.get(token, (0, 0.0))
            if self.store.in_flight(token) + count >= quota.max_concurrent:
                raise QuotaExceeded(
                    f"{quota.max_concurrent} tasks are already queued or running", 1.0
                )
            if quota.cpu_seconds is not None:
                need = min(need, quota.cpu_seconds)
                self._check_budget(token, need, quota.cpu_seconds, quota.window, held)
            reserve = 0.0 if math.isinf(need) else need
            self._pending[token] = (count + 1, held + reserve)

        def journaled(committed: bool) -> None:  # on the journal's writer thread
            with self._admission:
                count, held = self._pending.pop(token)
                if count > 1:
                    self._pending[token] = (count - 1, held - reserve)
            if committed:
                self.metrics.accepted.inc()
                self._enqueue(task.id)

        try:
            return self.store.add_future(token, policy_name, task, reserve, module_sha256,
                                         journaled)
        except BaseException:
            journaled(False)
            raise

    def _check_budget(
        self, token: str, need: float, budget: float, window: float, pending: float
    ) -> None:
        now = time.time()
        charges = self.store.charges(token, now - window)
        spent = sum(charge for _, charge in charges)
        reserved = self.store.reserved(token) + pending
        excess = spent + reserved + need - budget
        if excess <= 1e-9:
            return
        retry, freed = 1.0, 0.0  # if only running tasks hold it, their end frees it
        for finished_at, charge in charges:
            freed += charge
            if freed >= excess:
                retry = max(1.0, finished_at + window - now)
                break
        raise QuotaExceeded(
            f"{spent:.2f} s charged and {reserved:.2f} s reserved of {budget:g} CPU seconds "
            f"in the last {window:g} s; this task reserves {need:g} s (its timeout times its CPUs "
            "plus the kill grace, at most the whole budget)", retry,
        )

    def cancel(self, task_id: str) -> Record | None:
        """Cancel a task: a queued one ends now; a running one has its guest stopped (on the
        thread back end, within a watchdog tick) and ends cancelled."""
        record = self.store.cancel(task_id)
        if record is not None and record.result is not None and task_id in self._queued:
            self._queued.discard(task_id)
            self._notify(task_id)
        elif record is not None and record.result is None:
            try:
                self._runner.cancel(task_id)
            except Exception:  # the record says cancelled; the run ends at its deadline
                log.exception("could not stop running task %s", task_id)
        return record

    def _enqueue(self, task_id: str) -> None:
        self._queued.add(task_id)
        self._queue.put(task_id)

    def _work(self) -> None:
        while True:
            task_id = self._queue.get()
            if task_id is None or self._stopping.is_set():
                return  # queued tasks stay queued in the journal for the next start
            self._queued.discard(task_id)
            try:
                self._handle(task_id)
            except Exception:  # the worker outlives anything; _handle rejected the task
                log.exception("worker: task %s could not be handled", task_id)

    def _handle(self, task_id: str) -> None:
        try:
            claimed = self.store.claim(task_id)
        except Exception as exc:
            self._reject(task_id, "internal error: the journaled task cannot be read: "
                         f"{type(exc).__name__}", 0.0)
            self._notify(task_id)
            raise
        if claimed is None:
            return  # cancelled while queued
        with self._running_lock:
            self._running += 1
        started = time.monotonic()
        try:
            self._execute(task_id, *claimed, started)
        except Exception as exc:
            self._reject(task_id, f"internal error: {type(exc).__name__}: {exc}",
                         time.monotonic() - started)
            raise
        finally:
            with self._running_lock:
                self._running -= 1
            self._notify(task_id)

    def _execute(self, task_id: str, policy: str, task: Task, started: float) -> None:
        try:
            result = self._runner.run(policy, task)
        except SandboxError as exc:
            self._reject(task_id, f"{type(exc).__name__}: {exc}", time.monotonic() - started,
                         type(exc).__name__)
            return
        except Exception as exc:
            log.exception("task %s failed on the host", task_id)
            self._reject(task_id, f"internal error: {type(exc).__name__}: {exc}",
                         time.monotonic() - started)
            return
        charge = max(time.monotonic() - started, result.metrics.cpu_s or 0.0)
        record = self.store.finish(task_id, result, charge)
        if record is not None and record.result is not None:
            self.metrics.observe(record.result, time.time() - record.submitted_at)

    def _reject(self, task_id: str, error: str, charge: float, reason: str = "internal") -> None:
        """Reject a task and charge it; if even the journal fails, log it (the task stays
        ``running`` there and is queued again at the next start)."""
        try:
            self.metrics.rejected.labels(reason=reason).inc()
            self.store.reject(task_id, error, charge)
        except Exception:
            log.exception("could not record the rejection of task %s", task_id)

    def _notify(self, task_id: str) -> None:
        try:
            self.on_final(task_id)
        except Exception:
            log.exception("final-state notification for task %s failed", task_id)

    def _release(self) -> None:
        """Stop taking tasks, wait up to ``shutdown_grace`` for running ones, close the runner.

        Queued tasks stay in the journal; a task still running when the grace period ends is
        queued again at the next start.
        """
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + self.config.service.shutdown_grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("shutdown grace ended with tasks running; they run again at next start")
            return  # closing sandboxes under running tasks could crash the runtime
        self._runner.close()
