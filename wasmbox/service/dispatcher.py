"""Admission (auth-checked quotas), the durable queue and the workers that run tasks."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from wasmbox.errors import SandboxError
from wasmbox.lifecycle import Closeable
from wasmbox.models import Policy, Result, Task
from wasmbox.policy import apply
from wasmbox.sandbox import Sandbox
from wasmbox.service.config import Backend, ServiceConfig
from wasmbox.service.metrics import ServiceMetrics
from wasmbox.service.store import Record, TaskStore

log = logging.getLogger("wasmbox.service")

# A task started this many times without finishing (the service died each time) is rejected.
MAX_ATTEMPTS = 3


class QuotaExceeded(Exception):
    """A token is over one of its quotas; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Runner(Protocol):
    """Runs one task under a named policy somewhere (threads here, or a cluster)."""

    def run(self, policy: str, task: Task) -> Result: ...

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
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
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
        return len(recovered)

    def submit(self, token: str, policy_name: str, task: Task) -> Record:
        """Check the policy and the token's quotas, journal the task, queue it.

        Raises `SandboxError` for a task the policy refuses and `QuotaExceeded`.
        """
        self._ensure_open()
        apply(self.config.policies[policy_name], task)
        quota = self.config.tokens[token]
        with self._admission:  # check-then-insert must not interleave between requests
            if self.store.in_flight(token) >= quota.max_concurrent:
                raise QuotaExceeded(
                    f"{quota.max_concurrent} tasks are already queued or running", 1.0
                )
            if quota.cpu_seconds is not None:
                used = self.store.cpu_used(token, time.time() - quota.window)
                if used >= quota.cpu_seconds:
                    raise QuotaExceeded(
                        f"{used:.2f} of {quota.cpu_seconds:g} CPU seconds used in the last "
                        f"{quota.window:g} s", quota.window,
                    )
            self.store.add(token, policy_name, task)
        self.metrics.accepted.inc()
        self._enqueue(task.id)
        record = self.store.get(task.id)
        assert record is not None
        return record

    def cancel(self, task_id: str) -> Record | None:
        """Cancel a queued task now; a running one is marked cancelled when it ends."""
        record = self.store.cancel(task_id)
        if record is not None and record.result is not None and task_id in self._queued:
            self._queued.discard(task_id)
            self.on_final(task_id)
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
            claimed = self.store.claim(task_id)
            if claimed is None:
                continue  # cancelled while queued
            with self._running_lock:
                self._running += 1
            try:
                self._execute(task_id, *claimed)
            finally:
                with self._running_lock:
                    self._running -= 1
                self.on_final(task_id)

    def _execute(self, task_id: str, policy: str, task: Task) -> None:
        try:
            result = self._runner.run(policy, task)
        except SandboxError as exc:
            self.metrics.rejected.labels(reason=type(exc).__name__).inc()
            self.store.reject(task_id, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            log.exception("task %s failed on the host", task_id)
            self.metrics.rejected.labels(reason="internal").inc()
            self.store.reject(task_id, f"internal error: {type(exc).__name__}: {exc}")
            return
        record = self.store.finish(task_id, result)
        if record is not None and record.result is not None:
            self.metrics.observe(record.result, time.time() - record.submitted_at)

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
        if any(t.is_alive() for t in self._threads):
            log.warning("shutdown grace ended with tasks running; they run again at next start")
            return  # closing sandboxes under running tasks could crash the runtime
        self._runner.close()
