"""Where the service's threads and runner processes run (``[service] cpus``).

The service's own threads take turns holding one GIL; spread over cores, each hand-off woke a
thread on another core. With runner processes running the guests, the service's threads
share one core by default; the runner processes keep every CPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.service._support import ALICE, auth, wait_final
from wasmbox.errors import ConfigError
from wasmbox.service._placement import Placement, placed, plan
from wasmbox.service.config import ServiceSettings

ALLOWED = frozenset(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a process allowed 2 CPUs")


def settings(**fields: Any) -> ServiceSettings:
    return ServiceSettings.model_validate(fields)


@pytest.mark.parametrize(("fields", "allowed", "expected"), [
    ({}, {0, 1}, Placement(frozenset({0}), frozenset({0, 1}))),  # the default: processes
    ({"runner": "threads"}, {0, 1}, None),  # the runs are on the service's threads
    ({"runner": "processes"}, {0, 1}, Placement(frozenset({0}), frozenset({0, 1}))),
    ({"runner": "processes"}, {2, 3, 5}, Placement(frozenset({2}), frozenset({2, 3, 5}))),
    ({"runner": "processes"}, {3}, None),  # one CPU: nothing to place
    ({"runner": "processes", "cpus": "all"}, {0, 1}, None),
    ({"backend": "dask", "scheduler": "tcp://127.0.0.1:1"}, {0, 1}, None),
    ({"cpus": [1]}, {0, 1, 2}, Placement(frozenset({1}), frozenset({0, 1, 2}))),
])
def test_the_placement_follows_the_runner_and_the_setting(
    fields: dict[str, Any], allowed: set[int], expected: Placement | None
) -> None:
    assert plan(settings(**fields), frozenset(allowed)) == expected


def test_cpus_the_process_may_not_use_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cpus \[5\] are not among"):
        plan(settings(cpus=[0, 5]), frozenset({0, 1}))


@pytest.mark.parametrize("value", [[], "some", [-1], [0.5], 7])
def test_a_malformed_cpus_setting_is_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        settings(cpus=value)


def test_the_thread_that_placed_the_service_gets_its_cpus_back() -> None:
    if len(ALLOWED) < 2:
        pytest.skip("needs a process allowed 2 CPUs")
    before = os.sched_getaffinity(0)
    with placed(settings(cpus=[min(ALLOWED)])) as placement:
        assert placement is not None
        assert os.sched_getaffinity(0) == {min(ALLOWED)}
    assert os.sched_getaffinity(0) == before


def _affinity_of(threads: list[threading.Thread]) -> list[set[int]]:
    return [os.sched_getaffinity(t.native_id or 0) for t in threads]


def _service_threads(client: TestClient) -> tuple[list[threading.Thread], threading.Thread]:
    """This service's dispatcher workers and journal writer (not another test's)."""
    dispatcher = client.app.state.wasmbox.dispatcher  # type: ignore[attr-defined]
    return dispatcher._threads, dispatcher.store._writer


@TWO_CPUS
def test_runner_processes_run_beside_a_service_on_one_core(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(runner="processes", runner_processes=1)
    service_cpu = {min(ALLOWED)}
    workers, writer = _service_threads(client)
    assert workers and _affinity_of(workers) == [service_cpu] * len(workers)
    assert _affinity_of([writer]) == [service_cpu]
    runner = client.app.state.wasmbox.dispatcher._runner  # type: ignore[attr-defined]
    # Every CPU: a CPU-bound guest is not held to what is left beside the service.
    assert [os.sched_getaffinity(pid) for pid in runner.pids] == [set(ALLOWED)]
    response = client.post("/v1/tasks", headers=auth(ALICE),
                           json={"kind": "wasm", "module_b64": wasm_b64["hello"]})
    assert response.status_code == 202
    assert wait_final(client, response.json()["id"])["result"]["status"] == "completed"
    assert os.sched_getaffinity(0) == set(ALLOWED)  # the test's own thread: untouched


@TWO_CPUS
def test_the_thread_runner_stays_on_every_cpu(make_client: Callable[..., TestClient]) -> None:
    workers, writer = _service_threads(make_client(runner="threads"))
    assert workers and _affinity_of([*workers, writer]) == [set(ALLOWED)] * (len(workers) + 1)
