"""`Sandbox.map` over a Dask distributed cluster.

Each worker keeps warm sandboxes (one per policy) in a `SandboxPlugin`, closed when the worker
shuts down. Tasks travel as pydantic models; a result travels as a `_Shipped`: its fields as a
flat dict, its output as JSON text encoded once on the worker, its files as bytes, so what it
costs to move never depends on how deeply the task nested its output (a deep ``Result``
cannot be pickled at all). Outputs nested deeper than `MAX_RESULT_DEPTH` come back as
``output_rejected``. A task's Dask key is its id, so the same task submitted twice runs once
and a late duplicate completion is ignored; a task whose worker dies is run again elsewhere at
most once (the scheduler's ``allowed-failures`` is lowered to 1), and a host error on a worker
is retried once (``retries=1``). Each task is settled on its own: whatever goes wrong with one
never discards the others' results, and tasks no worker is left to run fail after
``no_workers_timeout`` seconds instead of waiting forever.

Worker processes must not be forked after wasmtime is loaded (the child deadlocks): create
the cluster under ``dask.config.set(cluster_config())``, which selects the spawn method.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
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
        futures: dict[str, Future[Any]] = {}
        for task in items:
            if task.id in futures or task.id in settled:
                continue  # one run per task id
            try:
                portable = _portable(task)
            except SandboxError as exc:
                settled[task.id] = exc
                continue
            futures[task.id] = self.client.submit(
                _run_on_worker, portable, self.policy,
                key=KEY_PREFIX + task.id, retries=1, pure=False,
            )
        try:
            self._settle(futures, settled)
        finally:
            pending = [f for f in futures.values() if not f.done()]  # type: ignore[no-untyped-call]
            if pending:
                self.client.cancel(pending)  # type: ignore[no-untyped-call]
        return [settled[t.id] for t in items]

    def _settle(self, futures: dict[str, Future[Any]],
                settled: dict[str, Result | SandboxError]) -> None:
        """Settle every future as it finishes; fail the rest once no worker is left."""
        finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        for task_id, future in futures.items():
            future.add_done_callback(  # type: ignore[no-untyped-call]
                lambda _f, task_id=task_id: finished.put(task_id))
        waiting = set(futures)
        alone_since: float | None = None
        while waiting:
            try:
                task_id = finished.get(timeout=WATCH_INTERVAL)
            except queue.Empty:
                if self._has_workers():
                    alone_since = None
                    continue
                now = time.monotonic()
                alone_since = now if alone_since is None else alone_since
                if now - alone_since < self.no_workers_timeout:
                    continue
                for task_id in waiting:
                    settled[task_id] = HostFailure(
                        f"no worker was left to run task {task_id!r}: the cluster had no "
                        f"worker for {self.no_workers_timeout:g} s")
                return
            if task_id in waiting:
                waiting.discard(task_id)
                settled[task_id] = _unwrap(futures[task_id])

    def _has_workers(self) -> bool:
        try:
            workers = self.client.nthreads(  # type: ignore[no-untyped-call]
                callback_timeout=max(WATCH_INTERVAL, 5.0))
        except Exception:  # the scheduler is unreachable: no worker runs anything either
            return False
        return bool(workers)


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


def _run_on_worker(task: Task, policy: Policy) -> _Shipped | _Refused:
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, SandboxPlugin):
        raise HostFailure(f"worker plugin {PLUGIN_NAME!r} is not installed")
    try:
        return _Shipped.of(plugin.sandbox(policy).run(task))
    except HostFailure:
        raise  # possibly transient: Dask retries it once
    except SandboxError as exc:
        return _Refused(type(exc), str(exc), dict(exc.__dict__))


def _unwrap(future: Future[Any]) -> Result | SandboxError:
    """What one finished future means for its task; never raises."""
    try:
        value = future.result()
        if isinstance(value, _Refused):
            return value.error()
        if not isinstance(value, _Shipped):
            return HostFailure(f"task {future.key!r}: a worker returned {type(value).__name__}")
        return value.result()
    except KilledWorker as exc:
        return HostFailure(f"task {future.key!r}: its worker died twice: {exc}")
    except SandboxError as exc:
        return exc
    except Exception as exc:  # raised on the worker or in transit: this task's alone
        return HostFailure(f"task {future.key!r} failed on the cluster: "
                           f"{type(exc).__name__}: {exc}")


def _portable(task: Task) -> Task:
    # A module path on this host may not exist on a worker: ship the bytes instead.
    if task.kind is TaskKind.WASM and task.module is not None:
        try:
            data = task.module.read_bytes()
        except OSError as exc:
            raise HostFailure(f"cannot read module {task.module}: {exc.strerror}") from exc
        return task.model_copy(update={"module": None, "module_bytes": data})
    return task


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
