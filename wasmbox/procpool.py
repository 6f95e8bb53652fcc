"""Run batches of tasks across cores: spawned worker processes, each with its own warm Sandbox.

Threads cannot scale a batch of short tasks: the Python around each task holds the GIL. A
`ProcessPool` starts `processes` workers with the *spawn* start method (never fork: a child
forked after wasmtime has started threads can deadlock), hands each one a copy of the
parent's policy and tier factories, and sends tasks in chunks so one round trip of the pipe
carries many tasks.

What travels:
- parent -> worker: a chunk of `Task`s (pickled: the parent trusts what it sends itself);
- worker -> parent: one frame per chunk, never a pickle. A worker runs guest code in its own
  address space, so what it sends back is treated like any other input from a task: a
  length-checked frame (a JSON header, then the bodies) of at most what the policy's caps
  allow, holding per task either a `Result` (JSON; files as raw bytes beside it) or the
  `SandboxError` that `Sandbox.run` raised, rebuilt in the parent as the same class from
  ``wasmbox.errors`` with the same fields (any other exception arrives as `HostFailure`
  naming it). A frame that breaks these rules is handled like a worker that died.

Each worker holds up to two chunks, so it never waits for the parent between chunks.

A worker that dies (killed, or a host crash inside it) loses the chunks it held. Their tasks
are re-run once, each on its own, on a fresh worker: a task that kills its worker again gets
a `HostFailure` in its slot and the rest of the batch is unaffected. So a task runs at most
twice, and only when its worker died before reporting it.

Internal: reached through ``Sandbox.map(..., processes=N)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal, overload

from wasmbox import telemetry
from wasmbox._procpool_wire import reply_bound
from wasmbox._procpool_worker import (
    START_TIMEOUT,
    Worker,
    describe_exit,
    spawn_worker,
    worker_main,
)
from wasmbox.errors import ConfigError, HostFailure, SandboxError
from wasmbox.lifecycle import Closeable, shielded
from wasmbox.models import Policy, Result, Task, TierName
from wasmbox.tiers.base import Tier
from wasmbox.workspace import reclaim_stale

# How long `close` waits for a worker to leave on its own before terminating it.
STOP_GRACE = 5.0
_CHUNKS_PER_WORKER = 4
_MAX_CHUNK = 64
_IN_FLIGHT = 2  # chunks a worker holds at once: one running, one waiting in its pipe
_PENDING = object()


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to build its Sandbox; must pickle (module-level factories)."""

    policy: Policy
    workspace_root: Path | None = None
    tiers: dict[TierName, Callable[[], Tier]] = field(default_factory=dict)


class ProcessPool(Closeable):
    """Spawned worker processes running `Sandbox.run` for a parent; results in task order.

    ``ProcessPool(policy, processes=2)`` starts the workers at once (each imports wasmbox and
    builds its own Sandbox; a second or so). `map` runs a batch, `close` stops every worker;
    the pool is a context manager. Not thread-safe: one `map` at a time.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        processes: int | None = None,
        workspace_root: Path | None = None,
        tiers: dict[TierName, Callable[[], Tier]] | None = None,
    ) -> None:
        self._workers: list[Worker] = []
        count = processes if processes is not None else (os.cpu_count() or 1)
        if count < 1:
            raise ConfigError(f"processes must be at least 1, got {count}")
        config = WorkerConfig(policy or Policy(), workspace_root, dict(tiers or {}))
        self._reply_bytes = reply_bound(config.policy)
        try:
            self._config = pickle.dumps(config)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                "the pool's policy and tier factories must pickle (use module-level "
                f"functions, not lambdas): {exc}"
            ) from exc
        self._workspace_root = workspace_root
        starting: list[Worker] = []
        try:
            for _ in range(count):
                starting.append(self._start())
            for worker in starting:
                worker.wait_ready()
                self._workers.append(worker)
        except BaseException:
            self._workers = starting
            with shielded():
                self._shutdown(grace=0.0)
            self._closed = True
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._workers]

    @overload
    def map(self, tasks: Iterable[Task], *, chunksize: int | None = None,
            return_exceptions: Literal[False] = False) -> list[Result]: ...

    @overload
    def map(self, tasks: Iterable[Task], *, chunksize: int | None = None,
            return_exceptions: Literal[True]) -> list[Result | SandboxError]: ...

    def map(
        self,
        tasks: Iterable[Task],
        *,
        chunksize: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Result] | list[Result | SandboxError]:
        """Run `tasks` on the workers; results keep the order of `tasks`.

        As `Sandbox.map`, a task the host refuses (`PolicyViolation`, `ModuleRejected`, ...)
        raises: the first such error in task order, once every task has finished. With
        ``return_exceptions=True`` the error takes the task's slot instead and nothing is
        raised. `chunksize` tasks travel per round trip (default: about four chunks a worker,
        at most 64 tasks each). A KeyboardInterrupt stops every worker and closes the pool.
        """
        self._ensure_open()
        items = list(tasks)
        if chunksize is None:
            per = math.ceil(len(items) / (max(1, len(self._workers)) * _CHUNKS_PER_WORKER))
            chunksize = max(1, min(_MAX_CHUNK, per))
        if chunksize < 1:
            raise ConfigError(f"chunksize must be at least 1, got {chunksize}")
        slots: list[Any] = [_PENDING] * len(items)
        queue = deque(
            _Chunk(list(range(i, min(i + chunksize, len(items)))), retry=False)
            for i in range(0, len(items), chunksize)
        )
        try:
            self._drive(items, slots, queue)
        except BaseException:  # Ctrl-C or a bug: no worker may outlive the batch
            with shielded():
                self._closed = True
                self._shutdown(grace=0.0)
            raise
        if not return_exceptions:
            for slot in slots:
                if isinstance(slot, BaseException):
                    raise slot
        return slots

    def _drive(self, items: list[Task], slots: list[Any], queue: deque[_Chunk]) -> None:
        held: dict[Worker, deque[_Chunk]] = {}
        while queue or held:
            self._dispatch(items, queue, held)
            if not held:  # every worker is gone and could not be replaced
                for chunk in queue:
                    for i in chunk.indices:
                        slots[i] = HostFailure("no worker process is left to run the task")
                queue.clear()
                return
            waitables: list[Any] = []
            for worker in held:
                waitables += [worker.conn, worker.process.sentinel]
            ready = set(wait(waitables))
            for worker in list(held):
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                chunks = held[worker]
                chunk = chunks[0]
                replies = worker.receive(len(chunk.indices), self._reply_bytes)
                if replies is not None:
                    chunks.popleft()
                    if not chunks:
                        del held[worker]
                    for i, reply in zip(chunk.indices, replies, strict=True):
                        slots[i] = reply
                        if isinstance(reply, Result):  # the worker's registry is not exported
                            telemetry.record(reply)
                    continue
                del held[worker]
                self._bury(worker, list(chunks), slots, queue)

    def _dispatch(self, items: list[Task], queue: deque[_Chunk],
                  held: dict[Worker, deque[_Chunk]]) -> None:
        """Top every worker up to `_IN_FLIGHT` chunks, one round at a time so the first
        chunks spread over all workers. A re-run goes alone to an idle worker: a task
        suspected of killing its worker must not take an innocent one down with it."""
        for depth in range(_IN_FLIGHT):
            for worker in self._workers:
                chunks = held.get(worker, deque())
                if not queue or len(chunks) != depth:
                    continue
                if chunks and (chunks[-1].retry or queue[0].retry):
                    continue
                chunk = queue.popleft()
                chunks.append(chunk)
                held[worker] = chunks
                # A dead worker cannot take it; its sentinel reports the death below.
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send([items[i] for i in chunk.indices])

    def _bury(self, worker: Worker, chunks: list[_Chunk], slots: list[Any],
              queue: deque[_Chunk]) -> None:
        """A worker died (or sent what it must not) with `chunks` unreported: re-run their
        tasks singly once, fail the ones that were already a re-run, replace the worker."""
        code = worker.stop(0.0)
        self._workers.remove(worker)
        rerun = []
        for chunk in chunks:
            if chunk.retry:
                for i in chunk.indices:
                    slots[i] = HostFailure(
                        f"the worker process died ({describe_exit(code)}) while running "
                        "the task, twice"
                    )
            else:
                rerun += [_Chunk([i], retry=True) for i in chunk.indices]
        queue.extendleft(reversed(rerun))
        try:  # the new worker's Sandbox reclaims the workspace the dead one left
            fresh = self._start()
            fresh.wait_ready()
        except HostFailure:
            return  # fewer workers from now on; with none left, _drive fails the rest
        self._workers.append(fresh)

    def _start(self) -> Worker:
        return spawn_worker(worker_main, self._config)

    def _release(self) -> None:
        with shielded():
            self._shutdown(grace=STOP_GRACE)

    def _shutdown(self, grace: float) -> None:
        """Ask every worker to leave, wait `grace` seconds, then terminate and kill."""
        workers, self._workers = self._workers, []
        for worker in workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        codes = [worker.stop(grace) for worker in workers]
        if any(code != 0 for code in codes):
            reclaim_stale(self._workspace_root)  # what a killed worker left behind


@dataclass
class _Chunk:
    indices: list[int]
    retry: bool  # already a re-run after a worker died


__all__ = ["START_TIMEOUT", "STOP_GRACE", "ProcessPool", "WorkerConfig"]
