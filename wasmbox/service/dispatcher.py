"""Internal: admission (auth-checked quotas), the durable queue and the workers that run tasks.

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

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from wasmbox.errors import SandboxError
from wasmbox.lifecycle import Closeable
from wasmbox.models import Task, TaskKind
from wasmbox.policy import apply

# `X as X`: re-exported, defined here before the dispatcher was split into internal modules.
from wasmbox.service._admission import VALID_CACHE_SIZE as VALID_CACHE_SIZE
from wasmbox.service._admission import QuotaExceeded as QuotaExceeded
from wasmbox.service._admission import check_budget, max_charge, validate_module
from wasmbox.service._runners import DaskRunner as DaskRunner
from wasmbox.service._runners import Runner as Runner
from wasmbox.service._runners import ThreadRunner as ThreadRunner
from wasmbox.service._runners import make_runner as make_runner
from wasmbox.service.config import ServiceConfig
from wasmbox.service.metrics import ServiceMetrics
from wasmbox.service.store import Ended, Record, TaskStore
from wasmbox.validation import compile_schema

log = logging.getLogger("wasmbox.service")

# A task started this many times without finishing (the service died each time) is rejected.
MAX_ATTEMPTS = 3
# The retention sweep runs every quarter of the retention, within these bounds (seconds).
SWEEP_MIN_S, SWEEP_MAX_S = 0.1, 600.0
# After a shutdown stopped the runs in flight, how long the workers have to hand the journal
# the results of runs that ended first (seconds).
ABORT_JOIN_S = 5.0


class Dispatcher(Closeable):
    """Accepts tasks into the journal and runs them on `workers` threads.

    `on_final(task_id)` is called (from a worker or the journal's writer thread) whenever a
    task reaches a final state, once that state is durable.
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
        # Tasks queued or running (recovered at the start or journaled since): their tokens,
        # by id, until each one's final state is durable and `on_final` is called; and how
        # many each token has (its concurrency quota's count, without a query). Changed
        # under the admission lock.
        self._live: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        self._stopping = threading.Event()
        # Set when the shutdown stops the runs in flight: a run that fails from then on was
        # stopped under its task, which stays running in the journal (see `_release`).
        self._aborting = threading.Event()
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
        with self._admission:
            for task_id, token in self.store.unfinished().items():
                self._add_live(task_id, token)
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
        time the task is queued."""
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
            if self._in_flight.get(token, 0) + count >= quota.max_concurrent:
                raise QuotaExceeded(
                    f"{quota.max_concurrent} tasks are already queued or running", 1.0
                )
            if quota.cpu_seconds is not None:
                need = min(need, quota.cpu_seconds)
                check_budget(self.store, token, need, quota.cpu_seconds, quota.window, held)
            reserve = 0.0 if math.isinf(need) else need
            self._pending[token] = (count + 1, held + reserve)

        def journaled(committed: bool) -> None:  # on the journal's writer thread
            with self._admission:
                count, held = self._pending.pop(token)
                if count > 1:
                    self._pending[token] = (count - 1, held - reserve)
                if committed:  # no longer pending: in flight
                    self._add_live(task.id, token)
            if committed:
                self.metrics.accepted.inc()
                self._enqueue(task.id)

        try:
            return self.store.add_future(token, policy_name, task, reserve, module_sha256,
                                         journaled)
        except BaseException:
            journaled(False)
            raise

    def live_token(self, task_id: str) -> str | None:
        """The token of a task that is queued or running, as far as waiters know (None: not
        known to be; read the journal)."""
        return self._live.get(task_id)

    def cancel(self, task_id: str) -> Record | None:
        """Cancel a task: a queued one ends now; a running one has its guest stopped (on the
        thread back end, within a watchdog tick) and ends cancelled."""
        record = self.store.cancel(task_id)
        if record is not None and record.result is not None:
            # Final (cancelled while queued, even if a worker had just taken it from the
            # queue, or final before): its waiters hear it.
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

    def _execute(self, task_id: str, policy: str, task: Task, started: float) -> None:
        """Run the task and journal how it ended, not waiting for that (see `_finished`)."""
        try:
            result = self._runner.run(policy, task)
        except Exception as exc:
            if self._aborting.is_set():  # stopped by the shutdown: no final state
                log.warning("task %s was stopped by the shutdown: it runs again at the next "
                            "start (%s: %s)", task_id, type(exc).__name__, exc)
                return None
            if isinstance(exc, SandboxError):
                return self._reject(task_id, f"{type(exc).__name__}: {exc}",
                                    time.monotonic() - started, type(exc).__name__)
            log.exception("task %s failed on the host", task_id)
            return self._reject(task_id, f"internal error: {type(exc).__name__}: {exc}",
                                time.monotonic() - started)
        charge = max(time.monotonic() - started, result.metrics.cpu_s or 0.0)
        self.store.finish(task_id, result, charge,
                          lambda future: self._finished(task_id, future, charge))

    def _finished(self, task_id: str, future: Future[Ended], charge: float) -> None:
        """On the journal's writer thread, once a task's result is durable (or not)."""
        try:
            ended = future.result()
        except Exception as exc:  # the commit failed: the task is rejected instead
            log.error("task %s: its result could not be journaled: %r", task_id, exc)
            return self._reject(task_id, f"internal error: {type(exc).__name__}: {exc}", charge)
        if ended is not None:  # (the stored result, when it was submitted)
            self.metrics.observe(ended[0], time.time() - ended[1])
        self._notify(task_id)

    def _reject(self, task_id: str, error: str, charge: float, reason: str = "internal") -> None:
        """Reject and charge a task without waiting (waiters hear once that is durable); if
        even the journal fails, log it: the task stays ``running``, to run at the next start
        (until then its token's concurrency quota no longer counts it)."""

        def journaled(future: Future[None]) -> None:
            if (failure := future.exception()) is not None:
                log.error("could not record the rejection of task %s: %r", task_id, failure)
            self._notify(task_id)

        try:
            self.metrics.rejected.labels(reason=reason).inc()
            self.store.reject(task_id, error, charge, journaled)
        except Exception:
            log.exception("could not record the rejection of task %s", task_id)
            self._notify(task_id)

    def _add_live(self, task_id: str, token: str) -> None:
        self._live[task_id] = token
        self._in_flight[token] = self._in_flight.get(token, 0) + 1

    def _notify(self, task_id: str) -> None:
        with self._admission:
            token = self._live.pop(task_id, None)
            if token is not None:
                self._in_flight[token] -= 1
        try:
            self.on_final(task_id)
        except Exception:
            log.exception("final-state notification for task %s failed", task_id)

    def _release(self) -> None:
        """Stop taking tasks, wait up to ``shutdown_grace`` for running ones, close the runner.

        Queued tasks stay in the journal; a task still running when the grace period ends is
        queued again at the next start. Its run is stopped if the runner can do that safely
        (runner processes: cancelled, then the processes stopped); on the thread runner it
        goes on in the background until the process exits.
        """
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + self.config.service.shutdown_grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
        if not any(t.is_alive() for t in self._threads):
            self._runner.close()
            return
        self._aborting.set()  # before the runs fail, so no worker records their failure
        if not self._runner.abort():
            self._aborting.clear()
            log.warning("shutdown grace ended with tasks running; they run again at next start")
            return
        log.warning("shutdown grace ended with tasks running: stopped; they run again at the "
                    "next start")
        deadline = time.monotonic() + ABORT_JOIN_S
        for thread in self._threads:  # a run that ended first: its result reaches the journal
            thread.join(max(0.0, deadline - time.monotonic()))
