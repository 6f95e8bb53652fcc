"""Threat: a client that games its CPU budget (quota evasion, and through it denial of service).

A budget that only counts finished runs admits any number of concurrent CPU-bound tasks past
it; a budget that charges CPU time lets a task that sleeps (or blocks) hold a worker for free;
a budget that charges only completed runs lets a client burn host time on runs that end
rejected. The service reserves each task's largest possible charge (timeout x CPUs + kill
grace, at most the whole budget) at admission, settles it to ``max(CPU, wall seconds a worker
was held)`` when the task ends, and charges rejected runs the same way.

Token ``dave`` has 2.5 s per 600 s; a task with ``timeout = 0.5`` reserves 0.5 + 0.5 (kill
grace) = 1.0 s, so two fit and a third does not.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.service import conftest as service
from tests.service._support import ALICE, DAVE, auth
from wasmbox import Policy, Task
from wasmbox.models import Limits, TimeoutPolicy
from wasmbox.policy import apply
from wasmbox.service.dispatcher import max_charge

# The service fixtures (an in-process service, built guests as base64), used here too.
client = service.client
make_client = service.make_client
shared_module_cache = service.shared_module_cache
wasm_b64 = service.wasm_b64

# Generous: the first Python task of a session compiles the interpreter (minutes on a busy box).
WAIT_S = 300.0


def post(client: TestClient, body: dict[str, Any], secret: str = DAVE) -> Any:
    return client.post("/v1/tasks", json=body, headers=auth(secret))


def final_view(client: TestClient, task_id: str, secret: str = DAVE) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"/v1/tasks/{task_id}", params={"wait": 5},
                                          headers=auth(secret)).json()
        if view["final"]:
            return view
    raise AssertionError(f"task {task_id} never became final")


def burner(wasm_b64: dict[str, str], timeout: float = 0.5) -> dict[str, Any]:
    return {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
            "resources": {"timeout": timeout}}


def test_concurrent_cpu_bound_tasks_are_not_all_admitted_past_the_budget(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=0)  # nothing finishes: only reservations can refuse
    codes = [post(client, burner(wasm_b64)).status_code for _ in range(4)]
    assert codes == [202, 202, 429, 429]


def test_the_refusal_says_what_is_reserved_and_when_to_retry(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=0)
    for _ in range(2):
        assert post(client, burner(wasm_b64)).status_code == 202
    refused = post(client, burner(wasm_b64))
    assert refused.status_code == 429
    assert "2.00 s reserved" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1


def test_a_task_that_could_cost_more_than_the_budget_reserves_all_of_it(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=0)
    assert post(client, burner(wasm_b64, timeout=3)).status_code == 202  # 3.5 s > 2.5 s
    assert post(client, burner(wasm_b64, timeout=0.1)).status_code == 429


def test_a_finished_task_gives_back_its_reservation_and_pays_its_charge(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=1)
    quick = {"kind": "wasm", "module_b64": wasm_b64["hello"], "resources": {"timeout": 0.5}}
    view = final_view(client, post(client, quick).json()["id"])
    assert view["result"]["status"] == "completed"
    assert 0 < view["charged_s"] < 1.0  # settled below its 1.0 s reservation
    codes = [post(client, burner(wasm_b64)).status_code for _ in range(2)]
    assert codes == [202, 202]  # charge + 2 reservations fit in 2.5 s


def test_a_sleeping_task_is_charged_the_wall_time_it_held_a_worker(
    client: TestClient,
) -> None:
    source = "import time\n\ndef main(inp):\n    time.sleep(0.6)\n    return 1\n"
    task_id = post(client, {"kind": "python", "source": source, "tier": "wasm",
                            "resources": {"timeout": 5}}, ALICE).json()["id"]
    view = final_view(client, task_id, ALICE)
    assert view["result"]["status"] == "completed", view
    cpu = view["result"]["metrics"]["cpu_s"]
    assert cpu is not None and cpu < 0.6  # the sleep itself burns no CPU ...
    assert view["charged_s"] >= 0.6  # ... but held the worker, and that is charged


def test_a_rejected_run_is_charged(client: TestClient) -> None:
    no_start = base64.b64encode(bytes.fromhex("0061736d01000000")).decode()  # not a command
    task_id = post(client, {"kind": "wasm", "module_b64": no_start}, ALICE).json()["id"]
    view = final_view(client, task_id, ALICE)
    assert view["state"] == "rejected"
    assert view["charged_s"] is not None and view["charged_s"] > 0


def test_the_largest_possible_charge_counts_every_cpu_and_the_kill_grace() -> None:
    policy = Policy(limits=Limits(cpus=4), timeouts=TimeoutPolicy(run=2, kill_grace=0.5))
    task = Task.command(["true"], resources={"cpus": 3, "timeout": 1})
    assert max_charge(apply(policy, task)) == 1 * 3 + 0.5
    unbounded = Policy(allow_unbounded=True, timeouts=TimeoutPolicy(run=None))
    assert math.isinf(max_charge(apply(unbounded, Task.python("x = 1"))))
