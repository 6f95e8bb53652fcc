"""Scale-out on a real Dask LocalCluster: two spawned worker processes, one killed mid-run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, LocalCluster

from wasmbox import Resources, Status, Task
from wasmbox.distributed import KEY_PREFIX, DistributedSandbox, cluster_config, run_many


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with dask.config.set(cluster_config()), LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster, Client(cluster) as dask_client:
        yield dask_client


def attempts(client: Client, task: Task) -> int:
    """How many times the scheduler sent the task to a worker."""
    story = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.story(KEY_PREFIX + task.id)
    )
    return sum(1 for entry in story if entry[2] == "processing")


def kill_worker_running(client: Client, task: Task) -> None:
    """SIGKILL the worker process that is running `task`."""
    key = KEY_PREFIX + task.id
    for _ in range(1000):
        busy = [w for w, keys in client.processing().items() if key in keys]
        started = client.run(_executing, key, workers=busy) if busy else {}
        running = [w for w, flag in started.items() if flag]
        if running:
            pid = client.run(os.getpid, workers=running)[running[0]]
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
    raise AssertionError("the task never started")


def _executing(key: str, dask_worker: Any = None) -> bool:
    state = dask_worker.state.tasks.get(key)
    return state is not None and state.state == "executing"


def test_results_keep_the_order_of_the_tasks(client: Client, guests: dict[str, Path]) -> None:
    tasks = [Task.wasm(guests["json_transform"], input={"xs": [i, i]}) for i in range(8)]
    results = run_many(client, tasks)
    assert [r.output["sum"] for r in results] == [2 * i for i in range(8)]  # type: ignore[index]
    assert [r.task_id for r in results] == [t.id for t in tasks]


def test_tasks_run_on_both_workers(client: Client, guests: dict[str, Path]) -> None:
    slow = [Task.wasm(guests["infinite_loop"], resources=Resources(timeout=0.5)) for _ in range(2)]
    results = DistributedSandbox(client).map(slow)
    assert [r.status for r in results] == [Status.TIMEOUT] * 2
    assert sum(r.metrics.wall_s for r in results) > 0


def test_the_same_task_id_runs_once(client: Client, guests: dict[str, Path]) -> None:
    task = Task.wasm(guests["hello"])
    first, second = run_many(client, [task, task])
    assert first.run_id == second.run_id


def test_a_killed_worker_s_task_is_run_again_once_elsewhere(
    client: Client, guests: dict[str, Path]
) -> None:
    task = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=2))
    future = client.submit(lambda: None)  # warm the connection before timing anything
    future.result()
    sandbox = DistributedSandbox(client)
    import threading

    box: list[Any] = []
    runner = threading.Thread(target=lambda: box.append(sandbox.run(task)))
    runner.start()
    kill_worker_running(client, task)
    runner.join(60)
    assert box and box[0].status is Status.TIMEOUT
    assert attempts(client, task) == 2
