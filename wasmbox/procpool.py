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
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import pickle
import signal
import struct
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal, overload

from wasmbox import errors
from wasmbox.errors import ConfigError, HostFailure, SandboxError
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
_IN_FLIGHT = 2  # chunks a worker holds at once: one running, one waiting in its pipe
_HEADER = struct.Struct(">I")


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
        self._reply_bytes = _reply_bound(config.policy)
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
        held: dict[_Worker, deque[_Chunk]] = {}
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
                    continue
                del held[worker]
                self._bury(worker, list(chunks), slots, queue)

    def _dispatch(self, items: list[Task], queue: deque[_Chunk],
                  held: dict[_Worker, deque[_Chunk]]) -> None:
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

    def _bury(self, worker: _Worker, chunks: list[_Chunk], slots: list[Any],
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
                        f"the worker process died ({_describe_exit(code)}) while running "
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
        self.stopped = False
        self.exitcode: int | None = None

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def wait_ready(self) -> None:
        """Block until the worker built its Sandbox; `HostFailure` if it died or hung."""
        message = None
        if wait([self.conn, self.process.sentinel], START_TIMEOUT):
            with contextlib.suppress(EOFError, OSError):
                message = self.conn.recv_bytes(_READY_BYTES)
        if message != b"ready":
            code = self.stop(0.0)
            detail = (message.decode("utf-8", "replace") if message is not None
                      else _describe_exit(code))
            raise HostFailure(f"a worker process failed to start: {detail}")

    def receive(self, count: int, per_task: int) -> list[Any] | None:
        """The `count` replies of the oldest chunk, or None when the worker is gone or sent
        a frame that breaks the rules (too large, malformed, the wrong count)."""
        try:
            frame = self.conn.recv_bytes(count * per_task)
            return _decode_frame(frame, count)
        except (EOFError, OSError, _Malformed):
            return None

    def stop(self, grace: float) -> int | None:
        """Wait up to `grace` seconds for the worker to leave, then terminate, then kill.
        Idempotent; returns the exit code (negative: the signal that ended it)."""
        if self.stopped:
            return self.exitcode
        self.stopped = True
        try:
            self.process.join(grace)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(1.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        finally:
            self.conn.close()
        self.exitcode = self.process.exitcode
        self.process.close()
        return self.exitcode


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
_READY_BYTES = 64 * 1024
_RESULT, _RESULT_PY, _ERROR = "r", "p", "e"


class _Malformed(Exception):
    """A worker's frame that does not follow the protocol."""


def _reply_bound(policy: Policy) -> int:
    """The most one task's reply may take: streams (JSON may escape a byte into six),
    files, result.json re-encoded, and room for the rest."""
    limits, output = policy.limits, policy.output
    streams = 6 * (limits.stdout_bytes + limits.stderr_bytes)
    return streams + output.max_total_bytes + 6 * output.max_file_bytes + (1 << 20)


def _encode_frame(replies: list[tuple[str, bytes, dict[str, bytes]]]) -> bytes:
    """[kind, body, files] per task -> one frame: header length, JSON header, bodies."""
    header = []
    bodies: list[bytes] = []
    for kind, body, files in replies:
        header.append([kind, len(body), [[name, len(data)] for name, data in files.items()]])
        bodies.append(body)
        bodies.extend(files.values())
    head = json.dumps(header).encode()
    return b"".join([_HEADER.pack(len(head)), head, *bodies])


def _decode_frame(frame: bytes, count: int) -> list[Any]:
    """A worker's frame -> a Result or an exception per task; `_Malformed` if it is not one."""
    view = memoryview(frame)
    if len(view) < _HEADER.size:
        raise _Malformed("short frame")
    (head_len,) = _HEADER.unpack_from(view)
    at = _HEADER.size + head_len
    try:
        header = json.loads(bytes(view[_HEADER.size:at]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Malformed(f"header: {exc}") from exc
    if not isinstance(header, list) or len(header) != count:
        raise _Malformed("wrong number of replies")

    def take(size: object) -> bytes:
        nonlocal at
        if not isinstance(size, int) or size < 0 or at + size > len(view):
            raise _Malformed("a length runs past the frame")
        data = bytes(view[at:at + size])
        at += size
        return data

    replies = []
    for entry in header:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], list)):
            raise _Malformed("a reply entry has the wrong shape")
        kind, size, file_sizes = entry
        body = take(size)
        files = {}
        for item in file_sizes:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise _Malformed("a file entry has the wrong shape")
            files[item[0]] = take(item[1])
        replies.append(_decode(kind, body, files))
    if at != len(view):
        raise _Malformed("bytes left over after the last reply")
    return replies


def _encode_result(result: Result) -> tuple[str, bytes, dict[str, bytes]]:
    try:
        return _RESULT, result.model_dump_json(exclude={"files"}).encode(), result.files
    except ValueError:  # a str pydantic will not encode (a lone surrogate): escape it
        data = json.dumps(result.model_dump(mode="json", exclude={"files"})).encode()
        return _RESULT_PY, data, result.files


def _encode_error(exc: Exception) -> tuple[str, bytes, dict[str, bytes]]:
    # Class name, args and fields rather than a pickle: the parent only rebuilds classes of
    # wasmbox.errors, and PolicyViolation(rule, message) would not survive pickling anyway.
    if isinstance(exc, SandboxError) and getattr(errors, type(exc).__name__, None) is type(exc):
        name, args, fields = type(exc).__name__, exc.args, dict(vars(exc))
    else:
        name, args, fields = "HostFailure", (f"{type(exc).__name__}: {exc}",), {}
    fields.pop("__notes__", None)
    payload = {"type": name, "args": [_plain(a) for a in args],
               "fields": {k: _plain(v) for k, v in fields.items()},
               "remote": "".join(traceback.format_exception(exc))}
    return _ERROR, json.dumps(payload).encode(), {}


def _plain(value: object) -> object:
    """`value` if JSON carries it as is, else its text."""
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _decode(kind: object, body: bytes, files: dict[str, bytes]) -> Any:
    try:
        if kind == _RESULT:
            result = Result.model_validate_json(body)
        elif kind == _RESULT_PY:
            result = Result.model_validate(json.loads(body))
        elif kind == _ERROR:
            return _rebuild_error(json.loads(body))
        else:
            raise _Malformed(f"unknown reply kind {kind!r}")
    except ValueError as exc:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise _Malformed(f"a reply does not decode: {exc}") from exc
    return result.model_copy(update={"files": files}) if files else result


def _rebuild_error(payload: Any) -> BaseException:
    if not isinstance(payload, dict):
        raise _Malformed("an error reply is not an object")
    cls = getattr(errors, str(payload.get("type")), None)
    args, fields = payload.get("args"), payload.get("fields")
    if not (isinstance(cls, type) and issubclass(cls, SandboxError)
            and isinstance(args, list) and isinstance(fields, dict)):
        raise _Malformed("an error reply names no wasmbox error")
    exc = cls.__new__(cls)
    exc.args = tuple(args)
    for key, value in fields.items():
        if isinstance(key, str) and not key.startswith("__"):
            setattr(exc, key, value)
    exc.add_note(f"raised in a wasmbox worker process:\n{payload.get('remote', '')}")
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
        conn.send_bytes(f"{type(exc).__name__}: {exc}".encode()[:_READY_BYTES])
        return
    try:
        conn.send_bytes(b"ready")
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
                conn.send_bytes(_encode_frame(replies))
            except OSError:  # the parent is gone
                break
    finally:
        sandbox.close()
        conn.close()


__all__ = ["ProcessPool", "WorkerConfig"]
