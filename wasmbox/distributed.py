"""`Sandbox.map` over a Dask distributed cluster.

Each worker keeps warm sandboxes (one per policy) in a `SandboxPlugin`, created on first use
and closed when the worker shuts down. A batch travels in chunks, one Dask future each: the
first wave carries one task a chunk, and once the workers have said what a task costs, a
chunk carries about `CHUNK_TARGET_S` of work (at most `MAX_CHUNK` tasks, and never more than
its share of what is left), with `CHUNKS_PER_THREAD` chunks in flight per worker thread. A
module shared by the tasks of a chunk is pickled once for the chunk.

Tasks travel as pydantic models; a result travels as a `_Shipped`: its fields as a flat dict,
its output as JSON text encoded once on the worker, its files as bytes, so what it costs to
move never depends on how deeply the task nested its output (a deep ``Result`` cannot be
pickled at all). Outputs nested deeper than `MAX_RESULT_DEPTH` come back as
``output_rejected``.

Runs and retries (the documented bound): a single task's chunk has the task's id as its Dask
key, so the same task submitted twice at once runs once; within one batch a task id runs
once. A chunk whose worker dies is run again elsewhere at most once (the scheduler's
``allowed-failures`` is lowered to 1), so a task runs at most twice, and only when its
chunk's worker died: the tasks of that chunk that had already finished run again. A host
error (`HostFailure`) on a worker is retried once in place. Each task is settled on its own:
whatever goes wrong with one never discards the others' results, and tasks no worker is left
to run fail with `HostFailure` after ``no_workers_timeout`` seconds instead of waiting
forever.

Worker processes must not be forked after wasmtime is loaded (the child deadlocks): create
the cluster under ``dask.config.set(cluster_config())``, which selects the spawn method.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, Future, WorkerPlugin, get_worker
from distributed.scheduler import KilledWorker

from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Policy, Result, Status, Task, TaskKind
from wasmbox.sandbox import Sandbox

PLUGIN_NAME = "wasmbox-sandbox"
KEY_PREFIX = "wasmbox-task-"
MAX_RESULT_DEPTH = 128  # nesting a result's output may have to travel from a worker
NO_WORKERS_TIMEOUT = 60.0  # seconds a batch waits with no worker at all before failing
WATCH_INTERVAL = 1.0  # seconds between checks for workers while a batch waits
CHUNK_TARGET_S = 0.2  # worker seconds a chunk aims to carry; a chunk costs the client and
# scheduler ~5-15 ms of CPU, so at 200 ms that stays a small share of a core
MAX_CHUNK = 256  # tasks a chunk carries at most
CHUNKS_PER_THREAD = 2  # chunks in flight per worker thread: the next one waits on the worker


def cluster_config() -> dict[str, Any]:
    """Dask settings a wasmbox cluster needs: spawned workers, one re-run after a crash."""
    return {
        "distributed.worker.multiprocessing-method": "spawn",
        "distributed.scheduler.allowed-failures": 1,
    }


def run_many(client: Client, tasks: Iterable[Task], policy: Policy | None = None, *,
             no_workers_timeout: float = NO_WORKERS_TIMEOUT) -> list[Result]:
    """Run `tasks` on the cluster behind `client`; results keep the order of `tasks`."""
    return DistributedSandbox(client, policy, no_workers_timeout=no_workers_timeout).map(tasks)


class DistributedSandbox:
    """`Sandbox.run` / `Sandbox.map` semantics on a Dask cluster, under one policy.

    `run` raises host errors (`PolicyViolation`, `TierUnavailable`...) with their type, and
    `HostFailure` for a task whose worker died twice or that no worker was left to run. `map`
    never lets one task's error cost the others their results: that task's `Result` is
    ``failed`` with the error in its reason. `gather` gives each task's `Result` or error.
    """

    def __init__(self, client: Client, policy: Policy | None = None, *,
                 no_workers_timeout: float = NO_WORKERS_TIMEOUT) -> None:
        if not no_workers_timeout > 0:
            raise ValueError("no_workers_timeout must be positive")
        self.client = client
        self.policy = policy or Policy()
        self.no_workers_timeout = no_workers_timeout
        _prepare_cluster(client)

    def run(self, task: Task) -> Result:
        """Run one task on some worker and return its `Result`; raises its host error."""
        settled = self.gather([task])[0]
        if isinstance(settled, SandboxError):
            raise settled
        return settled

    def map(self, tasks: Iterable[Task]) -> list[Result]:
        """Run many tasks across the cluster; results keep the order of `tasks`.

        A task the host refused or could not run gets a ``failed`` `Result` whose reason
        names the error; the other tasks' results are unaffected.
        """
        items = list(tasks)
        return [_failed(task, s) if isinstance(s, SandboxError) else s
                for task, s in zip(items, self.gather(items), strict=True)]

    def gather(self, tasks: Iterable[Task]) -> list[Result | SandboxError]:
        """Each task's `Result`, or the typed error that task alone raised, in task order."""
        items = list(tasks)
        settled: dict[str, Result | SandboxError] = {}
        todo: list[Task] = []
        seen: set[str] = set()
        modules: dict[Path | bytes, bytes] = {}  # one bytes object per distinct module
        for task in items:
            if task.id in seen:
                continue  # one run per task id
            seen.add(task.id)
            try:
                todo.append(_portable(task, modules))
            except SandboxError as exc:
                settled[task.id] = exc
        if todo:
            _Batch(self, todo, settled).run()
        return [settled[t.id] for t in items]

    def _threads(self) -> int:
        """Worker threads the cluster has now; 0 when it has none or cannot be asked."""
        try:
            workers = self.client.nthreads(  # type: ignore[no-untyped-call]
                callback_timeout=max(WATCH_INTERVAL, 5.0))
        except Exception:  # the scheduler is unreachable: no worker runs anything either
            return 0
        return sum(n for n in workers.values() if isinstance(n, int))


class _Batch:
    """One `gather` in flight: tasks go out in chunks sized from what earlier chunks took.

    The first wave is one task a chunk; after that a chunk carries about `CHUNK_TARGET_S`
    of work (at most `MAX_CHUNK` tasks, and never more than its share of what is left, so
    the tail spreads over every worker). At most `CHUNKS_PER_THREAD` chunks per worker
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
        self.per_task_s: float | None = None  # worker seconds a task, recent chunks weigh most

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
            chunk = [self.queue.popleft() for _ in range(min(self._size(), len(self.queue)))]
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
        per_task = max(self.per_task_s, 1e-5)
        share = -(-len(self.queue) // (max(1, self.threads) * CHUNKS_PER_THREAD))
        return max(1, min(round(CHUNK_TARGET_S / per_task), MAX_CHUNK, share))

    def _settle(self, future: Future[Any], ids: list[str]) -> None:
        outcome = _unwrap(future, ids)
        if isinstance(outcome, SandboxError):
            for task_id in ids:
                self.settled[task_id] = outcome
            return
        settled, busy_s = outcome
        self.settled.update(zip(ids, settled, strict=True))
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


class SandboxPlugin(WorkerPlugin):
    """Keeps one warm `Sandbox` per policy on a worker; closes them on teardown."""

    # Another client registering it again (a second or restarted service) must not replace,
    # and so tear down, the sandboxes tasks are running in.
    idempotent = True

    def __init__(self) -> None:
        self._sandboxes: dict[str, Sandbox] = {}
        self._lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        self._sandboxes = {}
        self._lock = threading.Lock()

    def teardown(self, worker: Any) -> None:
        with self._lock:
            sandboxes, self._sandboxes = self._sandboxes, {}
        for sandbox in sandboxes.values():
            sandbox.close()

    def sandbox(self, policy: Policy) -> Sandbox:
        """The worker's sandbox for `policy`, created on first use."""
        key = policy.model_dump_json()
        with self._lock:
            found = self._sandboxes.get(key)
            if found is None:
                found = self._sandboxes[key] = Sandbox(policy)
        return found

    def __getstate__(self) -> dict[str, Any]:
        return {}  # sandboxes and locks stay on the worker that made them

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


@dataclass(frozen=True)
class _Refused:
    """A host error raised on a worker, carried back as data: its class does not pickle."""

    kind: type[SandboxError]
    text: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def error(self) -> SandboxError:
        exc = self.kind.__new__(self.kind)
        Exception.__init__(exc, self.text)
        exc.__dict__.update(self.attributes)
        return exc


@dataclass(frozen=True)
class _Shipped:
    """A `Result` as it leaves a worker: its flat fields, the output's JSON text, the files.

    Pickling this costs the same however deep the output nests; the output is parsed once,
    on the client, under `MAX_RESULT_DEPTH`.
    """

    header: dict[str, Any]  # the Result without output and files: fixed, shallow nesting
    output: bytes | None  # the output as JSON text; None when there is none
    files: dict[str, bytes]

    @classmethod
    def of(cls, result: Result) -> _Shipped:
        """Encode `result` on the worker; an output too deep to carry is rejected here."""
        output: bytes | None = None
        if result.output is not None:
            try:
                if _deeper_than(result.output, MAX_RESULT_DEPTH):
                    raise ValueError(f"it nests deeper than {MAX_RESULT_DEPTH} levels")
                output = json.dumps(result.output).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                result = _too_deep(result, str(exc))
        header = result.model_dump(exclude={"output", "files"})  # keeps inf/nan metrics
        return cls(header, output, dict(result.files))

    def result(self) -> Result:
        """Decode on the client; an output deeper than `MAX_RESULT_DEPTH` is rejected."""
        result = Result.model_validate(self.header)
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in self.files.items()):
            raise HostFailure("a worker sent output files that are not bytes")
        if self.output is None:
            return result.model_copy(update={"files": self.files})
        try:
            output = json.loads(self.output)  # json's C parser stops at the recursion limit
            if _deeper_than(output, MAX_RESULT_DEPTH):
                raise ValueError(f"it nests deeper than {MAX_RESULT_DEPTH} levels")
        except (ValueError, RecursionError) as exc:
            return _too_deep(result, str(exc))
        return result.model_copy(update={"output": output, "files": self.files})


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON-like `value` nests more than `limit` containers deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep(result: Result, why: str) -> Result:
    return result.model_copy(update={
        "status": Status.OUTPUT_REJECTED, "output": None, "files": {},
        "reason": f"the result cannot be carried back from a Dask worker: {why}",
    })


def _failed(task: Task, error: SandboxError) -> Result:
    """The `Result` `map` gives a task that raised `error` instead of running."""
    return Result(task_id=task.id, run_id=uuid.uuid4().hex, tier=task.tier,
                  status=Status.FAILED, reason=f"{type(error).__name__}: {error}")


def _run_chunk(tasks: list[Task], policy: Policy) -> tuple[list[_Shipped | _Refused], float]:
    """On a worker: run `tasks` in its warm sandbox, one after another; what each gave, and
    the seconds the chunk took. A host error is retried once in place, then carried back."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, SandboxPlugin):
        raise HostFailure(f"worker plugin {PLUGIN_NAME!r} is not installed")
    sandbox = plugin.sandbox(policy)
    t0 = time.perf_counter()
    shipped: list[_Shipped | _Refused] = []
    for task in tasks:
        for attempt in (1, 2):
            try:
                shipped.append(_Shipped.of(sandbox.run(task)))
            except HostFailure as exc:
                if attempt == 1:
                    continue  # possibly transient: once more
                shipped.append(_Refused(type(exc), str(exc), dict(exc.__dict__)))
            except SandboxError as exc:
                shipped.append(_Refused(type(exc), str(exc), dict(exc.__dict__)))
            except Exception as exc:  # a host bug costs this task alone, not its chunk
                shipped.append(_Refused(HostFailure, f"{type(exc).__name__}: {str(exc)[:2000]}"))
            break
    return shipped, time.perf_counter() - t0


def _chunk_key(ids: list[str]) -> str:
    """A chunk's Dask key: a single task's is its id, so the same task submitted twice (or
    by `run` and `map` at once) runs once; a longer chunk's is a digest of its ids."""
    if len(ids) == 1:
        return KEY_PREFIX + ids[0]
    digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}chunk-{len(ids)}-{digest}"


def _unwrap(future: Future[Any], ids: list[str]
            ) -> tuple[list[Result | SandboxError], float] | SandboxError:
    """What one finished chunk means for its tasks, and its worker seconds; never raises."""
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


def _decode(key: str, value: Any, ids: list[str]
            ) -> tuple[list[Result | SandboxError], float] | SandboxError:
    """A chunk's answer checked: one entry per task, each for its task, a finite duration."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list)
            and len(value[0]) == len(ids) and isinstance(value[1], float)):
        return HostFailure(f"chunk {key!r}: a worker returned {type(value).__name__}, "
                           f"not one answer for each of its {len(ids)} tasks")
    settled = [_one(task_id, item) for task_id, item in zip(ids, value[0], strict=True)]
    busy_s = value[1] if math.isfinite(value[1]) and value[1] > 0 else 0.0
    return settled, busy_s


def _one(task_id: str, item: Any) -> Result | SandboxError:
    """One task's entry of a chunk's answer, checked; never raises."""
    if isinstance(item, _Refused):
        return item.error()
    if not isinstance(item, _Shipped):
        return HostFailure(f"task {task_id!r}: a worker returned {type(item).__name__}")
    try:
        result = item.result()
    except SandboxError as exc:
        return exc
    except Exception as exc:  # a malformed header: pydantic refused it
        return HostFailure(f"task {task_id!r}: a worker sent a malformed result: "
                           f"{type(exc).__name__}: {str(exc)[:200]}")
    if result.task_id != task_id:
        return HostFailure(f"task {task_id!r}: a worker answered for {result.task_id!r}")
    return result


def _portable(task: Task, modules: dict[Path | bytes, bytes]) -> Task:
    """`task` as a worker can run it: its module's bytes, not a path on this host. Tasks of one
    batch that share a module share one bytes object (a chunk pickles it once); a path is read
    once a batch."""
    data = task.module_bytes
    if task.kind is TaskKind.WASM and task.module is not None:
        data = modules.get(task.module)
        if data is None:
            try:
                data = task.module.read_bytes()
            except OSError as exc:
                raise HostFailure(f"cannot read module {task.module}: {exc.strerror}") from exc
            data = modules[task.module] = modules.setdefault(data, data)
    elif data is not None:
        data = modules.setdefault(data, data)
    if data is None or (data is task.module_bytes and task.module is None):
        return task
    return task.model_copy(update={"module": None, "module_bytes": data})


_PREPARED: weakref.WeakSet[Client] = weakref.WeakSet()
_PREPARED_LOCK = threading.Lock()


def _prepare_cluster(client: Client) -> None:
    with _PREPARED_LOCK:
        if client in _PREPARED:
            return
        client.register_plugin(SandboxPlugin(), name=PLUGIN_NAME)
        client.run_on_scheduler(_allow_one_failure)  # type: ignore[no-untyped-call]
        _PREPARED.add(client)


def _allow_one_failure(dask_scheduler: Any) -> None:
    # A task whose worker dies is re-run elsewhere once; a second death fails it for good.
    dask_scheduler.allowed_failures = min(dask_scheduler.allowed_failures, 1)
