"""Internal: one `ProcessPool` worker — the parent's handle on it and the loop it runs.

The worker builds a Sandbox from the pickled `WorkerConfig`, says ``ready``, then runs the
chunks of tasks it is sent and answers each with one frame (`_procpool_wire`). The service's
`ProcessRunner` runs `runner_main` instead: tasks one at a time, each under a named policy
and cancellable, the next ones possibly already waiting in the pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wasmbox._batch import Cancel
from wasmbox._procpool_wire import (
    READY_BYTES,
    Malformed,
    decode_frame,
    encode_error,
    encode_frame,
    encode_result,
)
from wasmbox.errors import HostFailure
from wasmbox.models import Policy, Task, TierName

if TYPE_CHECKING:
    from wasmbox.procpool import WorkerConfig

# How long a new worker may take to import wasmbox and build its Sandbox.
START_TIMEOUT = 120.0
DROPPED = b"dropped"  # a runner process's answer to a drop it will honour


class Worker:
    """The parent's handle on one worker process and its pipe."""

    def __init__(self, process: BaseProcess, conn: Connection,
                 control: Connection | None = None) -> None:
        self.process = process
        self.conn = conn
        self.control = control  # a runner process's control pipe (cancels, drops)
        self.stopped = False
        self.exitcode: int | None = None
        self._stopping = threading.Lock()  # a failed run and close() may stop it at once

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def wait_ready(self) -> None:
        """Block until the worker built its Sandbox; `HostFailure` if it died or hung."""
        message = None
        if wait([self.conn, self.process.sentinel], START_TIMEOUT):
            with contextlib.suppress(EOFError, OSError):
                message = self.conn.recv_bytes(READY_BYTES)
        if message != b"ready":
            code = self.stop(0.0)
            detail = (message.decode("utf-8", "replace") if message is not None
                      else describe_exit(code))
            raise HostFailure(f"a worker process failed to start: {detail}")

    def receive(self, count: int, per_task: int) -> list[Any] | None:
        """The `count` replies of the oldest chunk, or None when the worker is gone or sent
        a frame that breaks the rules (too large, malformed, the wrong count)."""
        try:
            frame = self.conn.recv_bytes(count * per_task)
            return decode_frame(frame, count)
        except (EOFError, OSError, Malformed):
            return None

    def stop(self, grace: float) -> int | None:
        """Wait up to `grace` seconds for the worker to leave, then terminate, then kill.
        Idempotent and thread-safe (a second caller waits for the first); returns the exit
        code (negative: the signal that ended it)."""
        with self._stopping:
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
                if self.control is not None:
                    self.control.close()
            self.exitcode = self.process.exitcode
            self.process.close()
            return self.exitcode


def _messages(conn: Connection) -> Iterator[Any]:
    """What the parent sends, until it says ``None`` or goes away."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        yield message


def spawn_worker(target: Callable[..., None], config: bytes, control: bool = False) -> Worker:
    """Start `target(conn, config)` in a spawned (never forked) daemon process; with
    `control`, `target(conn, config, control)` with a second pipe to the parent."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    args: tuple[Any, ...] = (child, config)
    ends = context.Pipe(duplex=True) if control else None  # (drops are answered)
    if ends is not None:
        args += (ends[0],)
    process = context.Process(target=target, args=args, name="wasmbox-worker", daemon=True)
    process.start()
    child.close()
    if ends is not None:
        ends[0].close()
    return Worker(process, parent, None if ends is None else ends[1])


def describe_exit(code: int | None) -> str:
    """A worker's exit code in words."""
    if code is None:
        return "did not answer"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def worker_main(conn: Connection, config_bytes: bytes) -> None:
    """Build a Sandbox, then run chunks until told to stop or the parent goes away."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from wasmbox.sandbox import Sandbox

    try:
        config: WorkerConfig = pickle.loads(config_bytes)
        sandbox = Sandbox(config.policy, workspace_root=config.workspace_root,
                          tiers=config.tiers)
    except Exception as exc:
        conn.send_bytes(f"{type(exc).__name__}: {exc}".encode()[:READY_BYTES])
        return
    try:
        conn.send_bytes(b"ready")
        for tasks in _messages(conn):
            replies = []
            for task in tasks:
                try:
                    replies.append(encode_result(sandbox.run(task)))
                except Exception as exc:
                    replies.append(encode_error(exc))
            try:
                conn.send_bytes(encode_frame(replies))
            except OSError:  # the parent is gone
                break
    finally:
        sandbox.close()
        conn.close()


@dataclass(frozen=True)
class RunnerConfig:
    """What a service runner process needs: a warm Sandbox per named policy; must pickle."""

    policies: dict[str, Policy]
    workspace_root: Path | None = None
    cpus: frozenset[int] | None = None  # where the process runs (None: where it was started)


def runner_main(conn: Connection, config_bytes: bytes, control: Connection) -> None:
    """A service runner process: ``("run", policy, task, module_key)`` in, one frame out.

    Tasks are run one at a time in the order they came; the parent may send the next ones
    before the first is answered (they wait in the pipe). A thread waits on `control` for
    ``("cancel", place)`` and ``("drop", place)``, naming a task by its place in that order (1
    for the first task sent): a cancel stops the running task's guest (its result then says
    CANCELLED, as in the service process) or makes a task not started yet start cancelled. A
    drop (the parent would move the task to an idle process) is answered on `control` at
    once: `DROPPED` if the task had not started (it will be answered with an error, unrun),
    else ``b"started"``. ``None`` or the parent going away ends the process. A task may come
    without its module bytes when the parent sent this process the same module
    (`module_key`) recently: see `ModuleMemo`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from wasmbox.sandbox import Sandbox

    sandboxes: dict[str, Sandbox] = {}
    try:
        config: RunnerConfig = pickle.loads(config_bytes)
        if config.cpus is not None:  # before any thread starts: each one inherits it
            os.sched_setaffinity(0, config.cpus)
        for name, policy in config.policies.items():
            sandboxes[name] = Sandbox(policy, workspace_root=config.workspace_root)
    except Exception as exc:
        for sandbox in sandboxes.values():
            sandbox.close()
        conn.send_bytes(f"{type(exc).__name__}: {exc}".encode()[:READY_BYTES])
        return
    # Import and probe the wasm tier now: each process's first task would pay for it (tens of
    # milliseconds, far more on a loaded host) while holding a service worker. A failure here
    # is the first task's to report.
    for sandbox in sandboxes.values():
        if TierName.WASM in sandbox.policy.allowed_tiers:
            with contextlib.suppress(Exception):
                sandbox.availability(TierName.WASM)
    cancels = RunOrder()

    def cancel() -> None:
        with contextlib.suppress(EOFError, OSError):  # EOF: the parent is gone
            while (message := control.recv()) is not None:
                match message:
                    case ("cancel", seq):
                        cancels.cancel(seq)
                    case ("drop", seq):
                        control.send_bytes(DROPPED if cancels.drop(seq) else b"started")

    threading.Thread(target=cancel, name="wasmbox-runner-cancel", daemon=True).start()
    modules = ModuleMemo()
    try:
        conn.send_bytes(b"ready")
        for _, policy, task, key in _messages(conn):
            token = cancels.start()
            try:
                task = modules.restore(task, key)  # (a dropped one too: memos stay in step)
                if token is None:
                    raise HostFailure("the task was moved to another runner process")
                # With its own switch: Sandbox.cancel finds a run only once it has begun.
                reply = encode_result(sandboxes[policy]._run(task, token))
            except Exception as exc:
                reply = encode_error(exc)
            finally:
                cancels.finish()
            try:
                conn.send_bytes(encode_frame([reply]))
            except OSError:  # the parent is gone
                break
    finally:
        for sandbox in sandboxes.values():
            sandbox.close()
        conn.close()
        control.close()


class RunOrder:
    """A runner process's cancels, by each task's place in the order the tasks were sent.

    A cancel for the running task throws its switch; one for a task still in the pipe (or a
    drop) is kept until that task starts (at most as many as the parent has in flight: it
    only names tasks it sent and has not heard back from); one for a task already answered
    is ignored.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = 0  # the place of the running (or last) task
        self._running: Cancel | None = None
        self._early: set[int] = set()
        self._dropped: set[int] = set()

    def start(self) -> Cancel | None:
        """The next task starts: its cancel switch (thrown already if it was cancelled), or
        None if it was dropped."""
        token = Cancel()
        with self._lock:
            self._started += 1
            early = self._started in self._early
            self._early.discard(self._started)
            if self._started in self._dropped:
                self._dropped.discard(self._started)
                return None
            self._running = token
        if early:
            token.cancel()
        return token

    def drop(self, seq: object) -> bool:
        """Skip the task sent `seq`-th when it comes; False if it has started already."""
        with self._lock:
            if isinstance(seq, int) and seq > self._started:
                self._dropped.add(seq)
                return True
            return False

    def finish(self) -> None:
        with self._lock:
            self._running = None

    def cancel(self, seq: object) -> None:
        """Cancel the task sent `seq`-th (anything but a positive int is ignored)."""
        if not isinstance(seq, int) or seq < 1:
            return
        with self._lock:
            if seq == self._started and self._running is not None:
                self._running.cancel()
            elif seq > self._started:
                self._early.add(seq)


class ModuleMemo:
    """The modules a runner process was sent last, so the same module is not re-sent each task.

    The parent keeps one per process and calls `strip` before sending; the process keeps its
    own and calls `restore` on receipt. Both see the same keys in the same order, so they
    hold the same entries. A key is the id of the parent's module bytes, which the parent's
    memo holds on to: no other object can have that id while the entry lasts.
    """

    SIZE = 4

    def __init__(self) -> None:
        self._held: OrderedDict[int, bytes] = OrderedDict()

    def strip(self, task: Task) -> tuple[Task, int | None]:
        """`task` as it travels (without its module when the process has it) and its key."""
        data = task.module_bytes
        if data is None:
            return task, None
        key = id(data)
        known = self._held.get(key) is data
        self._remember(key, data)
        return (task.model_copy(update={"module_bytes": None}) if known else task), key

    def restore(self, task: Task, key: int | None) -> Task:
        """A received task with its module put back."""
        if key is None:
            return task
        data = task.module_bytes
        if data is None:
            data = self._held[key]
            task = task.model_copy(update={"module_bytes": data})
        self._remember(key, data)  # a reuse is as recent here as in the parent's memo
        return task

    def _remember(self, key: int, data: bytes) -> None:
        self._held[key] = data
        self._held.move_to_end(key)
        while len(self._held) > self.SIZE:
            self._held.popitem(last=False)
