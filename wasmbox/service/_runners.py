"""Internal: where the service runs a task: threads in this process, runner processes, or a
Dask cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from wasmbox import telemetry
from wasmbox._procpool_wire import reply_bound
from wasmbox._procpool_worker import (
    ModuleMemo,
    RunnerConfig,
    Worker,
    describe_exit,
    runner_main,
    spawn_worker,
)
from wasmbox.errors import ConfigError, HostFailure, SandboxClosed
from wasmbox.lifecycle import Closeable, shielded
from wasmbox.models import Policy, Result, Status, Task
from wasmbox.sandbox import Sandbox
from wasmbox.service.config import Backend, RunnerKind, ServiceConfig
from wasmbox.workspace import reclaim_stale

log = logging.getLogger("wasmbox.service")

# How long `ProcessRunner.close` waits for its runner processes to leave on their own (all
# of them together), before it terminates, then kills, those still there.
STOP_GRACE = 5.0


class Runner(Protocol):
    """Runs one task under a named policy somewhere (threads here, or a cluster)."""

    def run(self, policy: str, task: Task) -> Result: ...

    def cancel(self, task_id: str) -> bool: ...

    def abort(self) -> bool:
        """Stop every run in flight without its result and release everything: those runs
        raise (a run that ended first returns its result). False, and nothing done, when
        this runner cannot stop its runs safely: it stays open."""
        ...

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

    def abort(self) -> bool:
        """Always False: closing a sandbox under a running guest could crash the runtime."""
        return False

    def _release(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()


class ProcessRunner(Closeable):
    """Runs each task in one of `processes` spawned runner processes (default: one per core).

    Each process holds a warm `Sandbox` per policy and runs one task at a time; the calling
    thread sends it the task and blocks on the reply (the GIL released), so the event loop
    and the journal keep this process's GIL to themselves. A reply is a length-checked frame,
    never a pickle, and an error comes back as the same `wasmbox.errors` class. A process that
    dies mid-task (or sends a frame that breaks the rules) fails that task with `HostFailure`
    -- it is not run again here -- and is replaced by a fresh one. `abort` stops the runs in
    flight and every process at once.
    """

    def __init__(self, policies: dict[str, Policy], processes: int | None = None,
                 workspace_root: Path | None = None) -> None:
        count = processes or os.cpu_count() or 1
        if count < 1:
            raise ConfigError(f"runner processes must be at least 1, got {count}")
        self._config = pickle.dumps(RunnerConfig(dict(policies), workspace_root))
        self._reply_bytes = max(reply_bound(p) for p in policies.values())
        self._workspace_root = workspace_root
        self._lock = threading.Lock()
        self._workers: list[Worker] = []  # every live process, idle or busy
        self._idle: queue.SimpleQueue[Worker | None] = queue.SimpleQueue()
        self._running: dict[str, Worker] = {}  # task id -> the process running it
        self._cancelled: set[str] = set()  # running tasks a caller cancelled
        self._aborted: set[str] = set()  # running tasks `abort` stopped
        self._memos: dict[Worker, ModuleMemo] = {}  # the modules each process was sent
        self._cancels = threading.Lock()  # one sender at a time on a control pipe
        starting = [self._spawn() for _ in range(count)]
        try:
            for worker in starting:
                worker.wait_ready()
                self._add(worker)
        except BaseException:
            with shielded():
                for worker in starting:
                    worker.stop(0.0)
            self._closed = True
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the live runner processes."""
        with self._lock:
            return [w.pid for w in self._workers]

    def run(self, policy: str, task: Task) -> Result:
        """Run `task` in an idle runner process (waiting for one if all are busy)."""
        worker = self._checkout()
        with self._lock:
            if self._closed:  # abort() took every process, this one too
                raise SandboxClosed("ProcessRunner is closed")
            self._running[task.id] = worker
        try:
            with contextlib.suppress(OSError, ValueError):  # dead: receive() says so
                worker.conn.send(("run", policy, *self._memos[worker].strip(task)))
            replies = worker.receive(1, self._reply_bytes)
        except BaseException:  # interrupted mid-task: the process's state is unknown
            with shielded():
                self._replace(worker)
            raise
        finally:
            with self._lock:
                del self._running[task.id]
                self._cancelled.discard(task.id)
                aborted = task.id in self._aborted
                self._aborted.discard(task.id)
        if replies is None:
            code = self._replace(worker)
            raise HostFailure(f"the runner process died ({describe_exit(code)}) while "
                              "running the task")
        self._idle.put(worker)
        reply = replies[0]
        if isinstance(reply, BaseException):
            raise reply
        assert isinstance(reply, Result)
        if aborted and reply.status is Status.CANCELLED:  # a result of the abort, not the task
            raise HostFailure("the runner was stopped before the task ended")
        # The runner process counted the run in its own registry, which nobody exports: count
        # it here, where the service's /metrics reads (the thread runner's Sandbox does this).
        telemetry.record(reply)
        return reply

    def cancel(self, task_id: str) -> bool:
        """Stop the task's guest now (its result says CANCELLED); False if not running."""
        with self._lock:
            worker = self._running.get(task_id)
            if worker is None:
                return False
            self._cancelled.add(task_id)
        self._send_cancel(worker, task_id)
        return True

    def abort(self) -> bool:
        """Close now, stopping the runs in flight: each guest is cancelled (its sandbox frees
        what it holds), then the processes are stopped as `close` does. Those runs raise
        `HostFailure`, unless a run ended on its own first (its result is returned) or a
        caller had cancelled it (its CANCELLED result is). Always True."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True  # no run starts from now on (see run)
            stopping = {t: w for t, w in self._running.items() if t not in self._cancelled}
            self._aborted.update(stopping)
        for task_id, worker in stopping.items():
            self._send_cancel(worker, task_id)
        self._release()
        return True

    def _send_cancel(self, worker: Worker, task_id: str) -> None:
        assert worker.control is not None
        with contextlib.suppress(OSError, ValueError), self._cancels:
            worker.control.send(task_id)

    def _checkout(self) -> Worker:
        while True:
            self._ensure_open()
            with self._lock:
                if not self._workers:
                    raise HostFailure("no runner process is left to run the task")
            with contextlib.suppress(queue.Empty):
                worker = self._idle.get(timeout=1.0)
                if worker is not None and not worker.stopped:
                    return worker
            # None: close() or a lost process woke the waiters; look again

    def _add(self, worker: Worker) -> None:
        with self._lock:
            closing = self._closed  # close() has taken (or will take) the list without it
            if not closing:
                self._memos[worker] = ModuleMemo()
                self._workers.append(worker)
        if closing:
            worker.stop(0.0)
        else:
            self._idle.put(worker)

    def _replace(self, worker: Worker) -> int | None:
        """Stop a process that died or broke the protocol and start a fresh one in its place
        (if that fails, one fewer); returns the old one's exit code."""
        code = worker.stop(0.0)
        with self._lock:
            if worker in self._workers:  # (not if close() took them all)
                self._workers.remove(worker)
            self._memos.pop(worker, None)
        if code != 0:
            reclaim_stale(self._workspace_root)  # the workspace a killed process left
        if self._closed:
            return code
        try:
            fresh = self._spawn()
            fresh.wait_ready()
        except HostFailure:
            log.exception("could not replace a runner process")
            self._idle.put(None)  # a waiter re-checks whether any process is left
            return code
        self._add(fresh)
        return code

    def _spawn(self) -> Worker:
        return spawn_worker(runner_main, self._config, control=True)

    def _release(self) -> None:
        with shielded(), self._lock:
            workers, self._workers = list(self._workers), []
        for worker in workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        deadline = time.monotonic() + STOP_GRACE
        codes = [worker.stop(max(0.0, deadline - time.monotonic())) for worker in workers]
        for _ in workers:
            self._idle.put(None)
        if any(code != 0 for code in codes):
            reclaim_stale(self._workspace_root)


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

    def abort(self) -> bool:
        """Always False: a task already on a worker runs to its own deadline anyway."""
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
    if config.service.runner is RunnerKind.PROCESSES:
        return ProcessRunner(config.policies, config.service.runner_processes or None)
    return ThreadRunner(config.policies, sandbox_factory)
