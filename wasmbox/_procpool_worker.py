"""Internal: one `ProcessPool` worker — the parent's handle on it and the loop it runs.

The worker builds a Sandbox from the pickled `WorkerConfig`, says ``ready``, then runs the
chunks of tasks it is sent and answers each with one frame (`_procpool_wire`). The service's
`ProcessRunner` runs `runner_main` instead: one task at a time, under a named policy, and
cancellable while it runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wasmbox._procpool_wire import (
    READY_BYTES,
    Malformed,
    decode_frame,
    encode_error,
    encode_frame,
    encode_result,
)
from wasmbox.errors import HostFailure
from wasmbox.models import Policy, Task

if TYPE_CHECKING:
    from wasmbox.procpool import WorkerConfig

# How long a new worker may take to import wasmbox and build its Sandbox.
START_TIMEOUT = 120.0


class Worker:
    """The parent's handle on one worker process and its pipe."""

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


def spawn_worker(target: Callable[[Connection, bytes], None], config: bytes) -> Worker:
    """Start `target(conn, config)` in a spawned (never forked) daemon process."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    process = context.Process(target=target, args=(child, config), name="wasmbox-worker",
                              daemon=True)
    process.start()
    child.close()
    return Worker(process, parent)


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


def runner_main(conn: Connection, config_bytes: bytes) -> None:
    """A service runner process: ``("run", policy, task)`` in, one frame out per task.

    A reader thread takes the pipe, so ``("cancel", task_id)`` reaches the running task's
    Sandbox (its result then says CANCELLED, as in the service process); ``None`` or the
    parent going away ends the process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from wasmbox.sandbox import Sandbox

    sandboxes: dict[str, Sandbox] = {}
    try:
        config: RunnerConfig = pickle.loads(config_bytes)
        for name, policy in config.policies.items():
            sandboxes[name] = Sandbox(policy, workspace_root=config.workspace_root)
    except Exception as exc:
        for sandbox in sandboxes.values():
            sandbox.close()
        conn.send_bytes(f"{type(exc).__name__}: {exc}".encode()[:READY_BYTES])
        return
    work: queue.SimpleQueue[tuple[str, Task] | None] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                message = None
            if message is None:
                return work.put(None)
            if message[0] == "cancel":
                for sandbox in sandboxes.values():
                    sandbox.cancel(message[1])
            else:
                work.put((message[1], message[2]))

    threading.Thread(target=read, name="wasmbox-runner-read", daemon=True).start()
    try:
        conn.send_bytes(b"ready")
        while (job := work.get()) is not None:
            try:
                reply = encode_result(sandboxes[job[0]].run(job[1]))
            except Exception as exc:
                reply = encode_error(exc)
            try:
                conn.send_bytes(encode_frame([reply]))
            except OSError:  # the parent is gone
                break
    finally:
        for sandbox in sandboxes.values():
            sandbox.close()
        conn.close()
