"""Internal: where the service runs a task: threads in this process, runner processes, or a
Dask cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from wasmbox import telemetry
from wasmbox._procpool_wire import reply_bound
from wasmbox._procpool_worker import (
    DROPPED,
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

    Each process holds a warm `Sandbox` per policy and runs its tasks one at a time, in the
    order it was sent them. A task goes to an idle process if there is one, else behind the
    shortest queue: a process holds up to `DEPTH` tasks, so it starts the next one as soon
    as it answers one instead of waiting a round trip of the service for it; a task still
    waiting behind another after `MOVE_AFTER` moves to a process gone idle, if its own process
    agrees it has not started it (so it never runs twice). The calling thread blocks until
    its task's reply is next and reads it (the GIL released), so the event loop and the
    journal keep this process's GIL to themselves. A reply is a length-checked frame, never
    a pickle, and an error comes back as the same `wasmbox.errors` class.

    A process that dies (or sends a frame that breaks the rules) fails the task it was running
    with `HostFailure` -- that task is not run again here -- and is replaced by a fresh one;
    the tasks queued behind it had not started and go to another process. `abort` stops the
    runs in flight and every process at once. With `cpus`, the processes run on those CPUs
    (the service's placement: see `wasmbox.service._placement`).
    """

    def __init__(self, policies: dict[str, Policy], processes: int | None = None,
                 workspace_root: Path | None = None, cpus: frozenset[int] | None = None
                 ) -> None:
        count = processes or os.cpu_count() or 1
        if count < 1:
            raise ConfigError(f"runner processes must be at least 1, got {count}")
        self._config = pickle.dumps(RunnerConfig(dict(policies), workspace_root, cpus))
        self._reply_bytes = max(reply_bound(p) for p in policies.values())
        self._workspace_root = workspace_root
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a place freed, a process come or gone
        self._lanes: list[_Lane] = []  # every live process
        self._replacing = 0  # lost processes whose replacements are starting
        self._running: dict[str, _Slot] = {}  # task id -> its slot, once sent to a process
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
            return [lane.worker.pid for lane in self._lanes]

    def run(self, policy: str, task: Task) -> Result:
        """Run `task` in a runner process (waiting for room if every process is full)."""
        slot = _Slot(task.id)
        try:
            while True:
                lane = self._send(slot, policy, task)
                try:
                    if not self._wait_turn(slot, lane) or slot.evicted:
                        continue  # not started there (moved, or the process was lost)
                    replies = lane.worker.receive(1, self._reply_bytes)
                except BaseException:  # interrupted: what the process runs is unknown
                    with shielded():
                        self._lose(lane)
                    raise
                break
        finally:
            with self._lock:
                if self._running.get(task.id) is slot:
                    del self._running[task.id]
        if replies is None:
            code = self._lose(lane)
            raise HostFailure(f"the runner process died ({describe_exit(code)}) while "
                              "running the task")
        self._pass_turn(lane, slot)
        reply = replies[0]
        if isinstance(reply, BaseException):
            raise reply
        assert isinstance(reply, Result)
        if slot.aborted and reply.status is Status.CANCELLED:  # the abort's, not the task's
            raise HostFailure("the runner was stopped before the task ended")
        # The runner process counted the run in its own registry, which nobody exports: count
        # it here, where the service's /metrics reads (the thread runner's Sandbox does this).
        telemetry.record(reply)
        return reply

    def cancel(self, task_id: str) -> bool:
        """Stop the task's guest now (its result says CANCELLED); False if not running.
        A task waiting in a process's queue starts cancelled."""
        with self._lock:
            slot = self._running.get(task_id)
            if slot is None:
                return False
            slot.cancelled = True  # (sent again with the task if it moves to another process)
            lane, seq = slot.lane, slot.seq
        assert lane is not None
        self._send_cancel(lane, seq)
        return True

    def abort(self) -> bool:
        """Close now, stopping the runs in flight: each guest is cancelled (its sandbox frees
        what it holds), then the processes are stopped as `close` does. Those runs raise
        `HostFailure`, unless a run ended on its own first (its result is returned) or a
        caller had cancelled it (its CANCELLED result is). Always True."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True  # no run starts from now on (see _send)
            stopping = [s for s in self._running.values() if not s.cancelled]
            for slot in stopping:
                slot.aborted = True
            self._room.notify_all()
        for slot in stopping:
            assert slot.lane is not None
            self._send_cancel(slot.lane, slot.seq)
        self._release()
        return True

    def _send(self, slot: _Slot, policy: str, task: Task) -> _Lane:
        """Queue `task` on the least busy process with room and send it there."""
        while True:
            with self._lock:
                lane = self._place(slot)
            with lane.sending:  # the pipe takes tasks in the order of the lane's slots
                with self._lock:
                    lane.reserved -= 1
                    if lane.lost:
                        continue
                    if self._closed:
                        self._room.notify_all()
                        raise self._refusal(slot)
                    lane.sent += 1
                    slot.lane, slot.seq, slot.evicted = lane, lane.sent, False
                    slot.turn.clear()
                    lane.slots.append(slot)
                    if len(lane.slots) == 1:
                        slot.turn.set()
                    self._running[slot.task_id] = slot
                    cancelled = slot.cancelled
                with contextlib.suppress(OSError, ValueError):  # dead: its reader says so
                    lane.worker.conn.send(("run", policy, *lane.memo.strip(task)))
            if cancelled:
                self._send_cancel(lane, slot.seq)
            return lane

    def _place(self, slot: _Slot) -> _Lane:
        """(Under the lock) a place on the process with the fewest tasks, waiting for one."""
        while True:
            if self._closed:
                raise self._refusal(slot)
            if not self._lanes and not self._replacing:
                raise HostFailure("no runner process is left to run the task")
            lane = min(self._lanes, key=_Lane.load, default=None)
            if lane is not None and lane.load() < DEPTH:
                lane.reserved += 1
                return lane
            self._room.wait()

    @staticmethod
    def _refusal(slot: _Slot) -> Exception:
        if slot.lane is None:  # never sent: the caller came too late
            return SandboxClosed("ProcessRunner is closed")
        return HostFailure("the runner was stopped before the task ended")

    def _wait_turn(self, slot: _Slot, lane: _Lane) -> bool:
        """Wait until `slot`'s reply is next (or it was evicted). A task still waiting behind
        another after `MOVE_AFTER` while some process is idle asks its process to skip it:
        False when it agreed (the task is to be sent again)."""
        while not slot.turn.wait(MOVE_AFTER):
            with self._lock:
                idle = any(other.load() == 0 for other in self._lanes)
            if idle and self._drop(slot, lane):
                return False
        return True

    def _drop(self, slot: _Slot, lane: _Lane) -> bool:
        """Ask `lane`'s process to skip `slot`'s task; True (and a stand-in left in its place,
        whose reply is discarded) when it had not started it."""
        control, answer = lane.worker.control, None
        assert control is not None
        with contextlib.suppress(OSError, ValueError, EOFError), lane.answers:
            with lane.control:
                control.send(("drop", slot.seq))
            # Waited for however long it takes (the process answers from a thread of its own,
            # at once): a guess either way could run the task twice or lose it.
            while not control.poll(MOVE_AFTER):
                if lane.lost:
                    break
            else:
                answer = control.recv_bytes(len(DROPPED))
        with self._lock:
            if answer != DROPPED or slot.evicted or slot not in lane.slots:
                return False
            stub = _Slot(slot.task_id)
            stub.dropped, stub.lane, stub.seq = True, lane, slot.seq
            place = lane.slots.index(slot)
            lane.slots[place] = stub
        if place == 0:  # its turn had come: discard the stand-in's reply (it comes at once)
            if lane.worker.receive(1, self._reply_bytes) is None:
                self._lose(lane)
            else:
                self._pass_turn(lane, stub)
        return True

    def _pass_turn(self, lane: _Lane, slot: _Slot) -> None:
        """`slot`'s reply was read: the next one's is next. A stand-in's reply is read and
        discarded here (the process answers it without running it)."""
        while True:
            with self._lock:
                if not (lane.slots and lane.slots[0] is slot):  # the lane was lost meanwhile
                    return
                lane.slots.popleft()
                self._room.notify()
                if not lane.slots:
                    return
                slot = lane.slots[0]
                if not slot.dropped:
                    slot.turn.set()
                    return
            if lane.worker.receive(1, self._reply_bytes) is None:
                self._lose(lane)
                return

    def _send_cancel(self, lane: _Lane, seq: int) -> None:
        assert lane.worker.control is not None
        with contextlib.suppress(OSError, ValueError), lane.control:
            lane.worker.control.send(("cancel", seq))

    def _add(self, worker: Worker) -> None:
        with self._lock:
            closing = self._closed  # close() has taken (or will take) the list without it
            if not closing:
                self._lanes.append(_Lane(worker))
                self._room.notify_all()
        if closing:
            worker.stop(0.0)

    def _lose(self, lane: _Lane) -> int | None:
        """Stop a process that died, broke the protocol or was interrupted mid-read; the
        tasks queued behind its running one go to other processes. The first caller starts
        a fresh process in its place (if that fails, one fewer). Returns its exit code."""
        with self._lock:
            first = self._evict(lane)
            replace = first and not self._closed
            if replace:
                self._replacing += 1
        code = lane.worker.stop(0.0)
        if not first:
            return code
        if code != 0:
            reclaim_stale(self._workspace_root)  # the workspace a killed process left
        if not replace:
            return code
        fresh = None
        try:
            fresh = self._spawn()
            fresh.wait_ready()
        except HostFailure:
            log.exception("could not replace a runner process")
            fresh = None
        finally:
            with self._lock:
                self._replacing -= 1
                self._room.notify_all()  # a waiter re-checks whether any process is left
        if fresh is not None:
            self._add(fresh)
        return code

    def _evict(self, lane: _Lane) -> bool:
        """(Under the lock) take `lane` out of service; False if it was already."""
        if lane.lost:
            return False
        lane.lost = True
        if lane in self._lanes:
            self._lanes.remove(lane)
        queued = list(lane.slots)[1:]  # the first is running: its reader hears the loss
        lane.slots.clear()
        for slot in queued:
            slot.evicted = True
            slot.turn.set()
        self._room.notify_all()
        return True

    def _spawn(self) -> Worker:
        return spawn_worker(runner_main, self._config, control=True)

    def _release(self) -> None:
        with shielded(), self._lock:
            lanes = list(self._lanes)
        for lane in lanes:
            with contextlib.suppress(OSError, ValueError):
                lane.worker.conn.send(None)  # after the tasks it holds
        deadline = time.monotonic() + STOP_GRACE
        codes = [lane.worker.stop(max(0.0, deadline - time.monotonic())) for lane in lanes]
        with self._lock:
            for lane in lanes:
                self._evict(lane)
            self._room.notify_all()
        if any(code != 0 for code in codes):
            reclaim_stale(self._workspace_root)


# Tasks a runner process holds at once: the one it runs and the next, already in its pipe.
DEPTH = 2
# How long a task waits behind another before it moves to a process gone idle meanwhile (so
# a short task does not wait out a long one).
MOVE_AFTER = 0.05


class _Slot:
    """One `run` call's task on its way through a runner process."""

    __slots__ = ("aborted", "cancelled", "dropped", "evicted", "lane", "seq", "task_id", "turn")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.lane: _Lane | None = None  # the process it was last sent to
        self.seq = 0  # its place in what that process was sent (the process cancels by it)
        self.turn = threading.Event()  # its reply is next, or it was evicted
        self.evicted = False  # its process was lost before it started
        self.cancelled = False  # a caller cancelled it
        self.aborted = False  # abort() stopped it
        self.dropped = False  # a stand-in for a task moved elsewhere: the process skips it


class _Lane:
    """A runner process and the tasks it was sent and has not answered, running one first."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.memo = ModuleMemo()  # the modules this process was sent
        self.slots: deque[_Slot] = deque()
        self.reserved = 0  # places taken by callers about to send
        self.sent = 0  # tasks ever sent here
        self.lost = False  # out of service: died, broke the protocol, or closed
        self.sending = threading.Lock()  # so the pipe's order is the slots' order
        self.control = threading.Lock()  # one message at a time on the control pipe
        self.answers = threading.Lock()  # one drop at a time (each is answered)

    def load(self) -> int:
        return len(self.slots) + self.reserved


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
    config: ServiceConfig, sandbox_factory: Callable[[Policy], Sandbox] = Sandbox,
    cpus: frozenset[int] | None = None,
) -> Runner:
    """The runner the configuration asks for (runner processes on `cpus`, if given)."""
    if config.service.backend is Backend.DASK:
        assert config.service.scheduler is not None  # checked by ServiceSettings
        return DaskRunner(config.service.scheduler, config.policies)
    if config.service.runner is RunnerKind.PROCESSES:
        if sandbox_factory is not Sandbox:
            raise ConfigError("a sandbox_factory builds sandboxes in this process: it needs "
                              "[service] runner = \"threads\"")
        return ProcessRunner(config.policies, config.service.runner_processes or None,
                             cpus=cpus)
    return ThreadRunner(config.policies, sandbox_factory)
