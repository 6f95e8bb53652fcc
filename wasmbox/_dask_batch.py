"""Internal: one `DistributedSandbox.gather` in flight: chunking, settling, refilling.

The first wave carries one task a chunk (unless an earlier batch of the same sandbox ran
tasks of the same code and arguments: it starts from their cost); once the workers have said
what a task costs, the batch is cut into equal chunks, a whole number of them per worker
thread (at least `CHUNKS_PER_BATCH_THREAD`, more when a chunk would carry more than
`CHUNK_TARGET_S` of work or `MAX_CHUNK` tasks), each at least `MIN_CHUNK_S` of work, with
`CHUNKS_PER_THREAD` chunks in flight per worker thread.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from distributed import Future
from distributed.scheduler import KilledWorker

from wasmbox import telemetry
from wasmbox._dask_wire import _decode
from wasmbox._dask_worker import _run_chunk
from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Result, Task

if TYPE_CHECKING:
    from wasmbox.distributed import DistributedSandbox

KEY_PREFIX = "wasmbox-task-"
WATCH_INTERVAL = 1.0  # seconds between checks for workers while a batch waits
CHUNK_TARGET_S = 1.0  # worker seconds a chunk carries at most; a chunk costs the client and
# scheduler ~5-15 ms of CPU, so this stays a small share of a core (at 200 ms their CPU per
# CPU-bound task was nearly twice as much, taken from the workers' two cores). Each chunk also
# costs each worker a gap between chunks: at 500 ms, on a loaded machine (tasks timed 2-3x
# slower), a batch of 60 CPU-bound tasks went out in 6-13 chunks instead of 4.
MAX_CHUNK = 256  # tasks a chunk carries at most
MIN_CHUNK_S = 0.01  # worker seconds a chunk carries at least (while that many tasks are left):
# a chunk costs the client, scheduler and worker event loops ~10 ms of CPU on the same cores
CHUNKS_PER_THREAD = 2  # chunks in flight per worker thread: the next one waits on the worker
CHUNKS_PER_BATCH_THREAD = 2  # equal chunks the sized part of a batch is cut into per worker
# thread, at least: cutting "a share of what is left" each time ended a 60-task batch in ~14
# chunks, the last ones a task each, every one costing the shared cores ~10 ms of CPU (4 a
# thread measured between the two). Always a whole number a thread: a batch cut into chunks
# of the target size ended in a short odd chunk (120 CPU-bound tasks: 28, 28, 28, 28, 8), and
# while one worker ran it the other sat idle. Cutting the rest in halving waves instead (15,
# 15, 8, 8, 4, 4, 3, 3) made the end shorter but each extra chunk cost more (CPU, a gap on the
# worker) than it saved: worker idle share 11.7-22.0% against 10.9-16.1%, load ~12.
REPLAN_FACTOR = 4.0  # the chunks are cut again from what is left when the estimate of a
# task's cost falls this far (a first estimate includes a module's compile). Not on smaller
# moves, nor when it rises: each new plan cuts at least 2 chunks a thread of what is left, and
# on a loaded machine (estimates moving 2x) re-planning at 2x cut 60 tasks in 6-8 chunks, not 4


class _Costs:
    """Worker seconds a task of each kind took in earlier batches (bounded, thread-safe).

    A batch whose kind of task was seen before starts with sized chunks instead of a first
    wave of one task a chunk; the kind is the task's code and arguments, not its input.
    """

    LIMIT = 256  # kinds remembered; the oldest is forgotten first

    def __init__(self) -> None:
        self._seconds: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def get(self, kind: Hashable) -> float | None:
        with self._lock:
            return self._seconds.get(kind)

    def put(self, kind: Hashable, seconds: float) -> None:
        with self._lock:
            self._seconds.pop(kind, None)
            self._seconds[kind] = seconds
            while len(self._seconds) > self.LIMIT:
                del self._seconds[next(iter(self._seconds))]


def _kind_of(task: Task) -> Hashable:
    """What a task's cost depends on besides its input (a module's bytes by their hash)."""
    code = hash(task.module_bytes) if task.module_bytes is not None else task.module
    return (task.kind, task.tier, code, task.source, task.entry, task.argv, task.args)


class _Batch:
    """One `gather` in flight: tasks go out in chunks sized from what earlier chunks took.

    The first wave is one task a chunk, unless `_Costs` knows the kind of task; after that the
    batch is cut into equal chunks, the same whole number for every worker thread (at least
    `CHUNKS_PER_BATCH_THREAD`; more when a chunk would carry more than `CHUNK_TARGET_S` of
    work or `MAX_CHUNK` tasks), so the workers run out of work together; but a chunk carries
    at least `MIN_CHUNK_S` of work: a chunk shorter than its own cost wastes the cores it
    shares. The plan is made again from what is left when the worker threads change or the
    cost estimate falls `REPLAN_FACTOR`-fold. At most `CHUNKS_PER_THREAD` chunks per worker
    thread are in flight, so a worker always has its next chunk while it runs one.
    """

    def __init__(self, owner: DistributedSandbox, tasks: list[Task],
                 settled: dict[str, Result | SandboxError]) -> None:
        self.owner = owner
        self.queue: deque[Task] = deque(tasks)
        self.settled = settled
        self.inflight: dict[str, list[str]] = {}  # future key -> its tasks' ids
        self.futures: dict[str, Future[Any]] = {}
        self.finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.threads = owner._threads() if len(tasks) > 1 else 1
        self.counted_at = time.monotonic()
        self.kind = _kind_of(tasks[0])
        # worker seconds a task, recent chunks weigh most; an earlier batch's to start with
        self.per_task_s: float | None = owner._costs.get(self.kind)
        # (worker threads, tasks a chunk, the cost estimate) the chunks were planned with
        self.plan: tuple[int, int, float] | None = None

    def run(self) -> None:
        """Submit, settle and refill until every task is settled; cancels what is left."""
        try:
            self._fill()
            alone_since: float | None = None
            while self.inflight:
                try:
                    key = self.finished.get(timeout=WATCH_INTERVAL)
                except queue.Empty:
                    self._count(force=True)
                    if self.threads:
                        alone_since = None
                        self._fill()
                        continue
                    now = time.monotonic()
                    alone_since = now if alone_since is None else alone_since
                    if now - alone_since >= self.owner.no_workers_timeout:
                        self._abandon()
                        return
                    continue
                ids = self.inflight.pop(key, None)
                if ids is not None:
                    self._settle(self.futures.pop(key), ids)
                    self._count()
                    self._fill()
        finally:
            if self.per_task_s is not None:
                self.owner._costs.put(self.kind, self.per_task_s)
            pending = [f for f in self.futures.values() if not f.done()]  # type: ignore[no-untyped-call]
            if pending:
                self.owner.client.cancel(pending)  # type: ignore[no-untyped-call]

    def _count(self, force: bool = False) -> None:
        """Refresh the worker thread count, at most once a `WATCH_INTERVAL` unless forced."""
        now = time.monotonic()
        if force or now - self.counted_at >= WATCH_INTERVAL:
            self.threads = self.owner._threads()
            self.counted_at = now

    def _fill(self) -> None:
        limit = max(1, self.threads) * CHUNKS_PER_THREAD
        while self.queue and len(self.inflight) < limit:
            chunk = [self.queue.popleft() for _ in range(self._size())]
            ids = [task.id for task in chunk]
            key = _chunk_key(ids)
            future = self.owner.client.submit(
                _run_chunk, chunk, self.owner.policy, key=key, retries=1, pure=False)
            self.inflight[key] = ids
            self.futures[key] = future
            future.add_done_callback(  # type: ignore[no-untyped-call]
                lambda _f, key=key: self.finished.put(key))

    def _size(self) -> int:
        """Tasks the next chunk carries."""
        if self.per_task_s is None:
            return 1  # nothing measured yet: one round trip a worker tells us the task's cost
        threads = max(1, self.threads)
        per_task = max(self.per_task_s, 1e-5)
        left = len(self.queue)
        if (self.plan is None or self.plan[0] != threads
                or per_task * REPLAN_FACTOR < self.plan[2]):
            per_thread = max(CHUNKS_PER_BATCH_THREAD,
                             math.ceil(left * per_task / (threads * CHUNK_TARGET_S)),
                             math.ceil(left / (threads * MAX_CHUNK)))
            self.plan = (threads, -(-left // (threads * per_thread)), per_task)
        floor = min(math.ceil(MIN_CHUNK_S / per_task), MAX_CHUNK)
        return min(left, max(1, floor, self.plan[1]))

    def _settle(self, future: Future[Any], ids: list[str]) -> None:
        outcome = _unwrap(future, ids)
        if isinstance(outcome, SandboxError):
            for task_id in ids:
                self.settled[task_id] = outcome
            return
        settled, busy_s, elsewhere = outcome
        self.settled.update(zip(ids, settled, strict=True))
        if elsewhere:  # the worker process counted these runs where nobody exports them
            for result in settled:
                if isinstance(result, Result):
                    telemetry.record(result)
        if busy_s > 0:
            # Halving the old estimate each chunk forgets a slow start (a module's first
            # compile on a fresh worker) within a few chunks.
            latest = busy_s / len(ids)
            known = self.per_task_s
            self.per_task_s = latest if known is None else (known + latest) / 2

    def _abandon(self) -> None:
        """No worker for `no_workers_timeout` seconds: fail every task not settled yet."""
        waiting = [i for ids in self.inflight.values() for i in ids]
        waiting += [task.id for task in self.queue]
        for task_id in waiting:
            self.settled[task_id] = HostFailure(
                f"no worker was left to run task {task_id!r}: the cluster had no "
                f"worker for {self.owner.no_workers_timeout:g} s")
        self.queue.clear()


def _chunk_key(ids: list[str]) -> str:
    """A chunk's Dask key: a single task's is its id, so the same task submitted twice (or
    by `run` and `map` at once) runs once; a longer chunk's is a digest of its ids."""
    if len(ids) == 1:
        return KEY_PREFIX + ids[0]
    digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}chunk-{len(ids)}-{digest}"


def _unwrap(future: Future[Any], ids: list[str]
            ) -> tuple[list[Result | SandboxError], float, bool] | SandboxError:
    """What one finished chunk means for its tasks, its worker seconds and whether it ran in
    another process; never raises."""
    try:
        value = future.result()
    except KilledWorker as exc:
        return HostFailure(f"chunk {future.key!r}: its worker died twice: {exc}")
    except SandboxError as exc:
        return exc
    except Exception as exc:  # raised on the worker or in transit: this chunk's alone
        return HostFailure(f"chunk {future.key!r} failed on the cluster: "
                           f"{type(exc).__name__}: {exc}")
    return _decode(str(future.key), value, ids)


