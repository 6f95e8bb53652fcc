"""The task API end to end, in process: submit, long-poll, files, cancel, Python, metrics."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tests.service._support import ALICE, auth, wait_final


def submit(client: TestClient, body: dict[str, object], secret: str = ALICE) -> dict[str, object]:
    response = client.post("/v1/tasks", json=body, headers=auth(secret))
    assert response.status_code == 202, response.text
    view: dict[str, object] = response.json()
    return view


def test_submitted_wasm_task_completes_with_its_output(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(client, {"kind": "wasm", "module_b64": wasm_b64["json_transform"],
                           "input": {"xs": [1, 2, 3]}})
    assert view["state"] in ("queued", "running", "finished")
    final = wait_final(client, str(view["id"]))
    assert final["state"] == "finished"
    assert final["result"]["status"] == "completed"
    assert final["result"]["output"] == {"sum": 6, "count": 3, "max": 3}


def test_output_files_are_listed_and_fetched_by_name(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    final = wait_final(client, str(view["id"]))
    assert "result.json" in final["result"]["files"]
    response = client.get(f"/v1/tasks/{view['id']}/files/result.json", headers=auth(ALICE))
    assert response.status_code == 200
    assert json.loads(response.content) == {"greeting": "hello"}


def test_multipart_upload_runs_the_module(client: TestClient, guests: dict[str, Path]) -> None:
    response = client.post(
        "/v1/tasks/upload",
        files={"module": ("m.wasm", guests["json_transform"].read_bytes())},
        data={"input": json.dumps({"xs": [4, 5]}), "policy": "strict"},
        headers=auth(ALICE),
    )
    assert response.status_code == 202, response.text
    final = wait_final(client, response.json()["id"])
    assert final["policy"] == "strict"
    assert final["result"]["output"] == {"sum": 9, "count": 2, "max": 5}


def test_python_source_runs_in_the_sandbox(client: TestClient) -> None:
    source = "def main(inp):\n    return {'total': sum(inp['xs'])}\n"
    view = submit(client, {"kind": "python", "source": source, "input": {"xs": [1, 2, 3]}})
    final = wait_final(client, str(view["id"]), rounds=12)
    assert final["result"]["status"] == "completed", final
    assert final["result"]["output"] == {"total": 6}


def test_python_source_that_names_a_server_file_is_code_not_a_path(client: TestClient) -> None:
    server_file = str(Path(json.__file__))  # an existing .py file on the service host
    view = submit(client, {"kind": "python", "source": server_file})
    final = wait_final(client, str(view["id"]), rounds=12)
    assert final["result"]["status"] == "failed"
    assert "SyntaxError" in final["result"]["stderr"]


def test_guest_timeout_is_a_result_status(client: TestClient, wasm_b64: dict[str, str]) -> None:
    view = submit(client, {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                           "resources": {"timeout": 0.3}})
    assert wait_final(client, str(view["id"]))["result"]["status"] == "timeout"


def test_invalid_module_is_refused_at_submission_with_the_reason(client: TestClient) -> None:
    body = {"kind": "wasm", "module_b64": "AGFzbQ=="}  # b"\0asm" and nothing else
    response = client.post("/v1/tasks", json=body, headers=auth(ALICE))
    assert response.status_code == 400
    assert "ModuleRejected" in response.json()["detail"]


def test_a_module_the_tier_refuses_after_acceptance_ends_rejected_with_the_reason(
    client: TestClient,
) -> None:
    no_start = bytes.fromhex("0061736d01000000")  # valid, but not a WASI command
    view = submit(client, {"kind": "wasm", "module_b64": base64.b64encode(no_start).decode()})
    final = wait_final(client, str(view["id"]))
    assert final["state"] == "rejected"
    assert "ModuleRejected" in final["error"] and "_start" in final["error"]


def test_cancel_of_a_queued_task_cancels_it_at_once(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(idle_client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    response = idle_client.post(f"/v1/tasks/{view['id']}/cancel", headers=auth(ALICE))
    assert response.status_code == 200
    assert response.json()["final"] is True
    assert response.json()["result"]["status"] == "cancelled"


def test_cancel_of_a_running_task_stops_its_guest(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(client, {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                           "resources": {"timeout": 5}})
    url = f"/v1/tasks/{view['id']}"
    for _ in range(200):
        if client.get(url, headers=auth(ALICE)).json()["state"] == "running":
            break
        time.sleep(0.01)
    cancel = client.post(f"{url}/cancel", headers=auth(ALICE)).json()
    assert cancel["state"] == "running"
    assert cancel["cancel_requested"] is True
    final = wait_final(client, str(view["id"]))
    assert final["result"]["status"] == "cancelled"
    assert final["result"]["reason"] == "cancelled while running"
    assert final["result"]["metrics"]["wall_s"] < 4.0  # stopped, not run out to its 5 s


def test_long_poll_returns_the_current_state_when_time_is_up(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(idle_client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    response = idle_client.get(f"/v1/tasks/{view['id']}", params={"wait": 0.2},
                               headers=auth(ALICE))
    assert response.status_code == 200
    assert response.json()["state"] == "queued"


def test_metrics_count_results_by_status_and_tier(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = submit(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    wait_final(client, str(view["id"]))
    text = client.get("/metrics").text
    assert 'wasmbox_service_tasks_finished_total{status="completed",tier="wasm"} 1.0' in text
    assert "wasmbox_service_task_latency_seconds_count" in text
    assert "wasmbox_service_queue_depth" in text
    assert "wasmbox_service_running_tasks" in text


def test_the_result_view_carries_every_result_field() -> None:
    from wasmbox.models import Result
    from wasmbox.service.schemas import ResultView

    assert set(ResultView.model_fields) == set(Result.model_fields)
