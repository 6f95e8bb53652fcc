"""`Sandbox.map` over a Dask distributed cluster.

Each worker keeps warm sandboxes (one per policy) in a `SandboxPlugin`, closed when the worker
shuts down. Tasks and results travel as the same pydantic models. A task's Dask key is its id,
so the same task submitted twice runs once and a late duplicate completion is ignored; a
task whose worker dies is run again elsewhere at most once (the scheduler's
``allowed-failures`` is lowered to 1), and a host error on a worker is retried once
(``retries=1``).

Worker processes must not be forked after wasmtime is loaded (the child deadlocks): create
the cluster under ``dask.config.set(cluster_config())``, which selects the spawn method.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, Future, WorkerPlugin, as_completed, get_worker
from distributed.scheduler import KilledWorker

from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Policy, Result, Task, TaskKind
from wasmbox.sandbox import Sandbox

PLUGIN_NAME = "wasmbox-sandbox"
KEY_PREFIX = "wasmbox-task-"


def cluster_config() -> dict[str, Any]:
    """Dask settings a wasmbox cluster needs: spawned workers, one re-run after a crash."""
    return {
        "distributed.worker.multiprocessing-method": "spawn",
        "distributed.scheduler.allowed-failures": 1,
    }


def run_many(client: Client, tasks: Iterable[Task], policy: Policy | None = None) -> list[Result]:
    """Run `tasks` on the cluster behind `client`; results keep the order of `tasks`."""
    return DistributedSandbox(client, policy).map(tasks)


class DistributedSandbox:
    """`Sandbox.run` / `Sandbox.map` semantics on a Dask cluster, under one policy.

    Host errors raised on a worker (`PolicyViolation`, `TierUnavailable`...) are raised here
    with their type; a task whose worker died twice raises `HostFailure`.
    """

    def __init__(self, client: Client, policy: Policy | None = None) -> None:
        self.client = client
        self.policy = policy or Policy()
        _prepare_cluster(client)

    def run(self, task: Task) -> Result:
        """Run one task on some worker and return its `Result`."""
        return self.map([task])[0]

    def map(self, tasks: Iterable[Task]) -> list[Result]:
        """Run many tasks across the cluster; results keep the order of `tasks`."""
        items = list(tasks)
        futures: dict[str, Future[Any]] = {}
        for task in items:
            if task.id not in futures:  # one run per task id
                futures[task.id] = self.client.submit(
                    _run_on_worker, _portable(task), self.policy,
                    key=KEY_PREFIX + task.id, retries=1, pure=False,
                )
        results: dict[str, Result] = {}
        try:
            for future in as_completed(list(futures.values())):  # type: ignore[no-untyped-call]
                value = _unwrap(future)
                results.setdefault(value.task_id, value)  # a duplicate completion is ignored
        finally:
            pending = [f for f in futures.values() if not f.done()]  # type: ignore[no-untyped-call]
            self.client.cancel(pending)  # type: ignore[no-untyped-call]
        return [results[t.id] for t in items]


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


def _run_on_worker(task: Task, policy: Policy) -> Result | _Refused:
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, SandboxPlugin):
        raise HostFailure(f"worker plugin {PLUGIN_NAME!r} is not installed")
    try:
        return plugin.sandbox(policy).run(task)
    except HostFailure:
        raise  # possibly transient: Dask retries it once
    except SandboxError as exc:
        return _Refused(type(exc), str(exc), dict(exc.__dict__))


def _unwrap(future: Future[Any]) -> Result:
    try:
        value = future.result()
    except KilledWorker as exc:
        raise HostFailure(f"task {future.key!r}: its worker died twice: {exc}") from exc
    if isinstance(value, _Refused):
        raise value.error()
    if not isinstance(value, Result):
        raise HostFailure(f"task {future.key!r}: a worker returned {type(value).__name__}")
    return value


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
