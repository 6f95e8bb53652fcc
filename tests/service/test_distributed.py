"""Scale-out on a real Dask LocalCluster: two spawned worker processes, one killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

from tests.service._support import local_cluster
from wasmbox import Resources, Result, Status, Task
from wasmbox.distributed import (
    KEY_PREFIX,
    MAX_RESULT_DEPTH,
    DistributedSandbox,
    _Shipped,
    run_many,
)
from wasmbox.errors import ModuleRejected
from wasmbox.models import AnomalyRule, Event, Metrics, TierName


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with local_cluster() as cluster, Client(cluster) as dask_client:
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
    box: list[Any] = []
    runner = threading.Thread(target=lambda: box.append(sandbox.run(task)))
    runner.start()
    kill_worker_running(client, task)
    runner.join(60)
    # Stopped by its limits: the wall clock, or on a fast host the default fuel, which the
    # loop burns in 2-3 s here (a policy does not let a task ask for more).
    assert box and box[0].status in (Status.TIMEOUT, Status.OUT_OF_FUEL)
    assert attempts(client, task) == 2


DEEP = "def main(inp):\n    v = []\n    for _ in range(800):\n        v = [v]\n    return v\n"


def test_a_deep_result_costs_only_its_own_task(client: Client, guests: dict[str, Path]) -> None:
    # A Result nested 800 deep cannot be pickled; it used to fail the whole batch.
    tasks = [Task.wasm(guests["json_transform"], input={"xs": [1, 2]}),
             Task.python(DEEP),
             Task.wasm(guests["json_transform"], input={"xs": [3, 4]})]
    first, deep, last = run_many(client, tasks)
    assert (first.output, last.output) == ({"sum": 3, "count": 2, "max": 2},
                                           {"sum": 7, "count": 2, "max": 4})
    assert deep.status is Status.OUTPUT_REJECTED, deep
    assert deep.output is None
    # The worker's own collection bound ([output] max_json_depth) now stops it first; the
    # depth-independent shipping is covered by test_results_too_deep_to_carry_are_rejected.
    assert "deeper than" in (deep.reason or "")


def test_a_refused_task_costs_only_its_own_result(client: Client, guests: dict[str, Path]) -> None:
    bad = Task.wasm(b"\0asm")  # not a module: the worker's sandbox raises ModuleRejected
    good = Task.wasm(guests["json_transform"], input={"xs": [5]})
    refused, result = DistributedSandbox(client).map([bad, good])
    assert refused.status is Status.FAILED and refused.task_id == bad.id
    assert (refused.reason or "").startswith("ModuleRejected")
    assert result.ok and result.output == {"sum": 5, "count": 1, "max": 5}
    errors = DistributedSandbox(client).gather([bad, good])
    assert isinstance(errors[0], ModuleRejected) and isinstance(errors[1], Result)
    with pytest.raises(ModuleRejected):
        DistributedSandbox(client).run(bad)


def test_a_batch_fails_in_bounded_time_when_no_worker_is_left() -> None:
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as empty:
        sandbox = DistributedSandbox(empty, no_workers_timeout=1.0)
        tasks = [Task.command(["true"]), Task.command(["false"])]
        box: list[list[Result]] = []
        runner = threading.Thread(target=lambda: box.append(sandbox.map(tasks)), daemon=True)
        runner.start()
        runner.join(60)  # a hang guard, not a timing assertion: the bound is 1 s
        finished = bool(box)
    assert finished, "map waited forever for workers"
    assert [r.status for r in box[0]] == [Status.FAILED] * 2
    assert all("no worker" in (r.reason or "") for r in box[0])


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_RESULT_DEPTH + 1, 5000, 200_000])
def test_results_too_deep_to_carry_are_rejected_not_raised(depth: int) -> None:
    # The worker's encoder and the client's decoder both bound depth without recursing.
    made = Result.model_construct(task_id="t", run_id="r", tier=TierName.WASM,
                                  status=Status.COMPLETED, output=_nested(depth),
                                  files={"result.json": b"[]"})
    sent = _Shipped.of(made)
    assert sent.output is None and sent.files == {}
    crafted = _Shipped(sent.header, b"[" * depth + b"]" * depth, {})  # a tampered worker
    for received in (sent.result(), crafted.result()):
        assert received.status is Status.OUTPUT_REJECTED and received.output is None
        assert received.task_id == "t"


def test_a_result_within_the_bound_arrives_whole() -> None:
    made = Result(task_id="t", run_id="r", tier=TierName.WASM, status=Status.COMPLETED,
                  output=_nested(MAX_RESULT_DEPTH - 1), files={"result.json": b"\xff binary"},
                  metrics=Metrics(extra={"odd": float("inf")}), stdout="out",
                  events=(Event(rule=AnomalyRule.OUTPUT_FLOOD, message="m", at_s=0.5),))
    received = _Shipped.of(made).result()
    assert received == made


def _runs_counted(status: str) -> float:
    """Runs this process's metrics registry (the one an application exports) counted."""
    from prometheus_client import REGISTRY

    labels = {"tier": "wasm", "status": status}
    return REGISTRY.get_sample_value("wasmbox_runs_total", labels) or 0.0


def _count_a_mixed_batch(client: Client, guests: dict[str, Path]) -> tuple[float, float]:
    before = _runs_counted("completed"), _runs_counted("failed")
    tasks = [Task.wasm(guests["hello"]) for _ in range(3)]
    tasks.append(Task.wasm(guests["exit_code"], input={"code": 3}))
    results = DistributedSandbox(client).map(tasks)
    assert [r.status for r in results] == [Status.COMPLETED] * 3 + [Status.FAILED]
    return _runs_counted("completed") - before[0], _runs_counted("failed") - before[1]


def test_runs_on_worker_processes_are_counted_once_in_the_caller_s_metrics(
    client: Client, guests: dict[str, Path]
) -> None:
    # The workers counted them in registries nobody exports.
    assert _count_a_mixed_batch(client, guests) == (3, 1)


def test_runs_on_an_in_process_worker_are_counted_once_in_the_caller_s_metrics(
    guests: dict[str, Path]
) -> None:
    # The worker's sandbox shares this process's registry and counted them already.
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                      dashboard_address=":0") as cluster, Client(cluster) as in_process:
        assert _count_a_mixed_batch(in_process, guests) == (3, 1)
