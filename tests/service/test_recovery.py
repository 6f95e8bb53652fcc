"""Durability: a SIGKILLed service loses no accepted task; SIGTERM lets running tasks finish."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service._support import ALICE, ServiceProcess, auth, wait_final, write_config


@pytest.fixture(params=["threads", "processes"])
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """One worker, so quick tasks queue behind a slow one; tasks run on it or in a runner
    process."""
    return write_config(tmp_path, workers=1, runner=request.param, runner_processes=1)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()


def wait_running(client: httpx.Client, task_id: str) -> None:
    for _ in range(500):
        if client.get(f"/v1/tasks/{task_id}").json()["state"] == "running":
            return
        time.sleep(0.01)
    raise AssertionError(f"task {task_id} never started")


def test_sigkill_mid_run_loses_no_accepted_task(
    config: Path, tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30) as client:
        slow = client.post("/v1/tasks", json={
            "kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
            "resources": {"timeout": 3}}).json()["id"]
        quick = [client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["hello"]})
                 .json()["id"] for _ in range(5)]
        wait_running(client, slow)
    runners = psutil.Process(services[0].process.pid).children()
    services[0].kill()

    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[1].url, timeout=30) as client:
        views = {task_id: wait_final(client, task_id) for task_id in [slow, *quick]}
    # The spinner is stopped by whichever limit comes first (its 3 s or the policy's fuel,
    # which a quiet machine burns in less): what matters is that it ran again and ended.
    assert views[slow]["result"]["status"] in ("timeout", "out_of_fuel")
    assert views[slow]["attempts"] == 2
    assert [views[q]["result"]["status"] for q in quick] == ["completed"] * 5
    # An orphaned runner process leaves once its task ends (the pipe to the service is gone).
    for process in runners:
        process.wait(30)  # raises if it is still running


def test_sigterm_lets_the_running_task_finish(
    config: Path, tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30) as client:
        task_id = client.post("/v1/tasks", json={
            "kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
            "resources": {"timeout": 1}}).json()["id"]
        wait_running(client, task_id)
    services[0].stop()
    assert services[0].process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises it

    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[1].url, timeout=30) as client:
        view = wait_final(client, task_id)
    assert view["result"]["status"] == "timeout"
    assert view["attempts"] == 1


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_a_task_still_running_when_the_grace_ends_runs_again_at_next_start(
    runner: str, tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    config = write_config(tmp_path, workers=1, runner=runner, runner_processes=1,
                          shutdown_grace=0.5)
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30) as client:
        task_id = client.post("/v1/tasks", json={
            "kind": "wasm", "module_b64": wasm_b64["sleep_long"], "args": ["rel", "3000"],
            "resources": {"timeout": 20}}).json()["id"]
        wait_running(client, task_id)
    runners = [p for p in psutil.Process(services[0].process.pid).children()
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(runners) == (runner == "processes")
    services[0].stop()  # 0.5 s of grace for a 3 s task
    # No runner process outlives the service (it would have lived until its task ended).
    assert [p.pid for p in runners if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] \
        == []

    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[1].url, timeout=30) as client:
        view = wait_final(client, task_id)
    assert view["result"]["status"] == "completed"
    assert "elapsed_ms=" in view["result"]["stdout"]  # it slept its 3 s in full, this time
    assert view["attempts"] == 2
