"""The service with ``backend = "dask"``: tasks run on a real LocalCluster, seen through the API."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from fastapi.testclient import TestClient

from tests.service._support import (
    ALICE,
    BOB,
    CAROL,
    auth,
    config_data,
    local_cluster,
    wait_final,
)
from wasmbox.distributed import KEY_PREFIX
from wasmbox.service import ServiceConfig, create_app


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """A two-process loopback cluster (spawned workers, as wasmtime requires); its address."""
    with local_cluster() as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def observer(scheduler: str) -> Iterator[Client]:
    """A client of our own, to ask the scheduler what it ran."""
    with Client(scheduler) as dask_client:
        yield dask_client


@pytest.fixture
def client(make_client: Callable[..., TestClient], scheduler: str) -> TestClient:
    """A running service whose tasks run on the cluster."""
    return make_client(backend="dask", scheduler=scheduler)


def submit(client: TestClient, body: dict[str, object], secret: str = ALICE) -> str:
    response = client.post("/v1/tasks", json=body, headers=auth(secret))
    assert response.status_code == 202, response.text
    task_id: str = response.json()["id"]
    return task_id


def ran_on_cluster(observer: Client, task_id: str) -> bool:
    """Whether the scheduler sent the task to a worker and got its result back."""
    story = observer.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.story(KEY_PREFIX + task_id)
    )
    return any(entry[1:3] == ("processing", "memory") for entry in story)


def wait_executing(observer: Client, task_id: str) -> None:
    """Until some worker is executing the task (its sandbox is in use)."""
    for _ in range(1000):
        if any(observer.run(_executing, KEY_PREFIX + task_id).values()):
            return
        time.sleep(0.01)
    raise AssertionError(f"task {task_id} never started on a worker")


def _executing(key: str, dask_worker: Any = None) -> bool:
    state = dask_worker.state.tasks.get(key)
    return state is not None and state.state == "executing"


def test_tasks_are_run_by_the_cluster_workers(
    client: TestClient, observer: Client, wasm_b64: dict[str, str]
) -> None:
    task_id = submit(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    assert wait_final(client, task_id)["result"]["status"] == "completed"
    assert ran_on_cluster(observer, task_id)


def test_wasm_task_completes_on_the_cluster(client: TestClient, wasm_b64: dict[str, str]) -> None:
    task_id = submit(client, {"kind": "wasm", "module_b64": wasm_b64["json_transform"],
                              "input": {"xs": [1, 2, 3]}})
    final = wait_final(client, task_id)
    assert final["result"]["status"] == "completed", final
    assert final["result"]["output"] == {"sum": 6, "count": 3, "max": 3}


def test_python_task_completes_on_the_cluster(client: TestClient) -> None:
    source = "def main(inp):\n    return {'total': sum(inp['xs'])}\n"
    task_id = submit(client, {"kind": "python", "source": source, "input": {"xs": [1, 2, 3]}})
    final = wait_final(client, task_id)
    assert final["result"]["status"] == "completed", final
    assert final["result"]["output"] == {"total": 6}


def test_output_files_made_on_a_worker_are_fetched(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    task_id = submit(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    assert "result.json" in wait_final(client, task_id)["result"]["files"]
    response = client.get(f"/v1/tasks/{task_id}/files/result.json", headers=auth(ALICE))
    assert response.status_code == 200
    assert json.loads(response.content) == {"greeting": "hello"}


def test_timeout_on_a_worker_is_a_result_status(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    task_id = submit(client, {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                              "resources": {"timeout": 0.3}})
    assert wait_final(client, task_id)["result"]["status"] == "timeout"


def test_module_a_worker_rejects_is_rejected_with_the_reason(client: TestClient) -> None:
    # valid wasm (passes the submit check) with no _start: the worker refuses it
    task_id = submit(client, {"kind": "wasm", "module_b64": "AGFzbQEAAAA="})
    final = wait_final(client, task_id)
    assert final["state"] == "rejected"
    assert "ModuleRejected" in final["error"]


def test_tasks_beyond_max_concurrent_get_429(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    # bob may have two tasks in flight; these two spin until their timeout.
    spinner = {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
               "resources": {"timeout": 3}}
    codes = [client.post("/v1/tasks", json=spinner, headers=auth(BOB)).status_code
             for _ in range(3)]
    assert codes == [202, 202, 429]


def test_cpu_spent_on_a_worker_counts_against_the_budget(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    burner = {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
              "resources": {"timeout": 0.5}}
    wait_final(client, submit(client, burner, CAROL), CAROL)
    second = client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["hello"]},
                         headers=auth(CAROL))
    assert second.status_code == 429


def test_another_service_starting_on_the_cluster_leaves_running_tasks_alone(
    make_client: Callable[..., TestClient], scheduler: str, observer: Client,
    wasm_b64: dict[str, str], tmp_path: Path,
) -> None:
    first = make_client(backend="dask", scheduler=scheduler)
    task_id = submit(first, {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                             "resources": {"timeout": 2}})
    wait_executing(observer, task_id)
    second = ServiceConfig.from_dict(
        config_data(tmp_path / "second.db", backend="dask", scheduler=scheduler)
    )
    with TestClient(create_app(second)):  # its start registers the worker plugin again
        assert wait_final(first, task_id)["result"]["status"] == "timeout"
