"""Run batches of tasks across cores: spawned worker processes, each with its own warm Sandbox.

Threads cannot scale a batch of short tasks: the Python around each task holds the GIL. A
`ProcessPool` starts `processes` workers with the *spawn* start method (never fork: a child
forked after wasmtime has started threads can deadlock), hands each one a copy of the
parent's policy and tier factories, and sends tasks in chunks so one round trip of the pipe
carries many tasks.

What travels:
- parent -> worker: a chunk of `Task`s (pickled);
- worker -> parent: per task either a `Result` (JSON from ``model_dump_json``, files beside it
  as raw bytes, since JSON cannot carry arbitrary bytes) or the exception `Sandbox.run`
  raised, rebuilt in the parent as the same class with the same fields.

A worker that dies (killed, or a host crash inside it) loses the chunk it was running. Its
tasks are re-run once, each on its own, on a fresh worker: a task that kills its worker again
gets a `HostFailure` in its slot and the rest of the batch is unaffected. So a task runs at
most twice, and only when its worker died before reporting it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from wasmbox.errors import ConfigError, HostFailure
from wasmbox.lifecycle import Closeable, shielded
from wasmbox.models import Policy, Result, Task, TierName
from wasmbox.tiers.base import Tier
from wasmbox.workspace import reclaim_stale

# How long a new worker may take to import wasmbox and build its Sandbox.
START_TIMEOUT = 120.0
# How long `close` waits for a worker to leave on its own before terminating it.
STOP_GRACE = 5.0
_CHUNKS_PER_WORKER = 4
_MAX_CHUNK = 64


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
        self._workers: list[_Worker] = []
        count = processes if processes is not None else (os.cpu_count() or 1)
        if count < 1:
            raise ConfigError(f"processes must be at least 1, got {count}")
        config = WorkerConfig(policy or Policy(), workspace_root, dict(tiers or {}))
        try:
            self._config = pickle.dumps(config)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                "the pool's policy and tier factories must pickle (use module-level "
                f"functions, not lambdas): {exc}"
            ) from exc
        self._workspace_root = workspace_root
        self._context = multiprocessing.get_context("spawn")
        starting: list[_Worker] = []
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

    def map(
        self,
        tasks: Iterable[Task],
        *,
        chunksize: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
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
            per = math.ceil(len(items) / (len(self._workers) * _CHUNKS_PER_WORKER))
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
        busy: dict[_Worker, _Chunk] = {}
        while queue or busy:
            for worker in self._workers:
                if worker not in busy and queue:
                    chunk = queue.popleft()
                    busy[worker] = chunk
                    # A dead worker cannot take it; its sentinel reports the death below.
                    with contextlib.suppress(OSError, ValueError):
                        worker.conn.send([items[i] for i in chunk.indices])
            if not busy:  # every worker is gone and could not be replaced
                for chunk in queue:
                    for i in chunk.indices:
                        slots[i] = HostFailure("no worker process is left to run the task")
                queue.clear()
                return
            waitables: list[Any] = []
            for worker in busy:
                waitables += [worker.conn, worker.process.sentinel]
            ready = set(wait(waitables))
            for worker in list(busy):
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                chunk = busy.pop(worker)
                replies = worker.receive()
                if replies is not None:
                    for i, reply in zip(chunk.indices, replies, strict=True):
                        slots[i] = _decode(reply)
                    continue
                self._bury(worker, chunk, slots, queue)

    def _bury(self, worker: _Worker, chunk: _Chunk, slots: list[Any],
              queue: deque[_Chunk]) -> None:
        """A worker died with `chunk` unreported: re-run its tasks singly once, replace it."""
        code = worker.stop(0.0)
        self._workers.remove(worker)
        if chunk.retry:
            for i in chunk.indices:
                slots[i] = HostFailure(
                    f"the worker process died ({_describe_exit(code)}) while running the "
                    "task, twice"
                )
        else:
            queue.extendleft(_Chunk([i], retry=True) for i in reversed(chunk.indices))
        try:  # the new worker's Sandbox reclaims the workspace the dead one left
            fresh = self._start()
            fresh.wait_ready()
        except HostFailure:
            return  # fewer workers from now on; with none left, _drive fails the rest
        self._workers.append(fresh)

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child, self._config), name="wasmbox-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

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


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def wait_ready(self) -> None:
        """Block until the worker built its Sandbox; `HostFailure` if it died or hung."""
        ready = wait([self.conn, self.process.sentinel], START_TIMEOUT)
        message = self.receive() if ready else None
        if message != "ready":
            code = self.stop(0.0)
            detail = message if isinstance(message, str) else _describe_exit(code)
            raise HostFailure(f"a worker process failed to start: {detail}")

    def receive(self) -> Any:
        """The next message, or None when the worker is gone."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def stop(self, grace: float) -> int | None:
        """Wait up to `grace` seconds for the worker to leave, then terminate, then kill."""
        self.process.join(grace)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        code = self.process.exitcode
        self.process.close()
        return code


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not answer"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


# --- what travels back, and how it is rebuilt ---------------------------------------------

_PENDING = object()
_RESULT, _PICKLED, _ERROR = 0, 1, 2


def _encode_result(result: Result) -> tuple[int, Any, Any]:
    try:
        data = result.model_dump_json(exclude={"files"}).encode()
    except ValueError:  # a str JSON cannot carry (a lone surrogate): pickle, slower but whole
        return _PICKLED, pickle.dumps(result, pickle.HIGHEST_PROTOCOL), None
    return _RESULT, data, result.files or None


def _encode_error(exc: Exception) -> tuple[int, Any, Any]:
    # Rebuilt from class, args and fields rather than by pickle: errors such as
    # PolicyViolation(rule, message) do not survive the default exception pickling.
    remote = "".join(traceback.format_exception(exc))
    try:
        state = pickle.dumps((type(exc), exc.args, dict(vars(exc))))
    except Exception:
        state = pickle.dumps((HostFailure, (f"{type(exc).__name__}: {exc}",), {}))
    return _ERROR, state, remote


def _decode(reply: tuple[int, Any, Any]) -> Any:
    kind, data, extra = reply
    if kind == _RESULT:
        result = Result.model_validate_json(data)
        return result.model_copy(update={"files": extra}) if extra else result
    if kind == _PICKLED:
        return pickle.loads(data)
    try:
        cls, args, state = pickle.loads(data)
        exc: BaseException = cls.__new__(cls)
        exc.args = args
        exc.__dict__.update(state)
    except Exception as failure:
        exc = HostFailure(f"a worker's error could not be rebuilt: {failure}")
    exc.add_note(f"raised in a wasmbox worker process:\n{extra}")
    return exc


# --- the worker process ---------------------------------------------------------------------


def _worker_main(conn: Connection, config_bytes: bytes) -> None:
    """Build a Sandbox, then run chunks until told to stop or the parent goes away."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from wasmbox.sandbox import Sandbox

    try:
        config: WorkerConfig = pickle.loads(config_bytes)
        sandbox = Sandbox(config.policy, workspace_root=config.workspace_root,
                          tiers=config.tiers)
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    try:
        conn.send("ready")
        while True:
            try:
                tasks = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if tasks is None:
                break
            replies = []
            for task in tasks:
                try:
                    replies.append(_encode_result(sandbox.run(task)))
                except Exception as exc:
                    replies.append(_encode_error(exc))
            try:
                conn.send(replies)
            except OSError:  # the parent is gone
                break
    finally:
        sandbox.close()
        conn.close()


__all__ = ["ProcessPool", "WorkerConfig"]
