"""`Sandbox.map` over a Dask distributed cluster.

Each worker keeps warm sandboxes (one per policy) in a `SandboxPlugin`, created on first use
and closed when the worker shuts down. A batch travels in chunks, one Dask future each: the
first wave carries one task a chunk (unless an earlier batch ran tasks of the same code and
arguments: it starts from their cost); once the workers have said what a task costs, the
batch is cut into equal chunks, the same whole number for every worker thread (at least
`CHUNKS_PER_BATCH_THREAD`, more when a chunk would carry over `CHUNK_TARGET_S` of work or
`MAX_CHUNK` tasks), so the workers run out of work together; a chunk carries at least
`MIN_CHUNK_S` of work, and `CHUNKS_PER_THREAD` chunks are in flight per worker thread. A
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
chunk's worker died: the tasks of that chunk that had already finished run again. Dask also
recomputes a chunk that had finished on the dead worker but whose result the client had not
fetched yet (the result lived only there): its tasks run once more too. A host
error (`HostFailure`) on a worker is retried once in place. Each task is settled on its own:
whatever goes wrong with one never discards the others' results, and tasks no worker is left
to run fail with `HostFailure` after ``no_workers_timeout`` seconds instead of waiting
forever.

Worker processes must not be forked after wasmtime is loaded (the child deadlocks): create
the cluster under ``dask.config.set(cluster_config())``, which selects the spawn method.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distributed import Client

# `X as X`: re-exported, defined here before the split into the internal _dask_* modules.
from wasmbox._dask_batch import CHUNK_TARGET_S as CHUNK_TARGET_S
from wasmbox._dask_batch import CHUNKS_PER_BATCH_THREAD as CHUNKS_PER_BATCH_THREAD
from wasmbox._dask_batch import CHUNKS_PER_THREAD as CHUNKS_PER_THREAD
from wasmbox._dask_batch import KEY_PREFIX as KEY_PREFIX
from wasmbox._dask_batch import MAX_CHUNK as MAX_CHUNK
from wasmbox._dask_batch import MIN_CHUNK_S as MIN_CHUNK_S
from wasmbox._dask_batch import WATCH_INTERVAL, _Batch, _Costs
from wasmbox._dask_wire import MAX_RESULT_DEPTH as MAX_RESULT_DEPTH
from wasmbox._dask_wire import _decode as _decode
from wasmbox._dask_wire import _Shipped as _Shipped
from wasmbox._dask_worker import PLUGIN_NAME as PLUGIN_NAME
from wasmbox._dask_worker import SandboxPlugin as SandboxPlugin
from wasmbox._dask_worker import _prepare_cluster
from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Policy, Result, Status, Task, TaskKind

NO_WORKERS_TIMEOUT = 60.0  # seconds a batch waits with no worker at all before failing


def cluster_config() -> dict[str, Any]:
    """Dask settings a wasmbox cluster needs: spawned workers, one re-run after a crash.

    It also quiets Dask's own diagnostics, whose CPU comes out of the cores the tasks run on
    (a nanny passes these to its worker): the worker's statistical profiler (a stack sample
    every 10 ms), the event-loop health tick (every 20 ms; a blocked loop is still reported
    after ``distributed.admin.tick.limit``) and the system monitor (psutil every 500 ms).
    """
    return {
        "distributed.worker.multiprocessing-method": "spawn",
        "distributed.scheduler.allowed-failures": 1,
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "2s",
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
        self._costs = _Costs()  # what each kind of task cost in earlier batches
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


def _failed(task: Task, error: SandboxError) -> Result:
    """The `Result` `map` gives a task that raised `error` instead of running."""
    return Result(task_id=task.id, run_id=uuid.uuid4().hex, tier=task.tier,
                  status=Status.FAILED, reason=f"{type(error).__name__}: {error}")


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
