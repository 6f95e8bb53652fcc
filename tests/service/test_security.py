"""Auth, quotas and hostile requests against the service."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, BOB, CAROL, auth, wait_final


def hello(wasm_b64: dict[str, str], **extra: object) -> dict[str, object]:
    return {"kind": "wasm", "module_b64": wasm_b64["hello"], **extra}


@pytest.mark.parametrize("headers", [{}, auth("wrong-secret"), {"Authorization": "Basic eDp5"}])
def test_request_without_a_known_token_gets_401(
    client: TestClient, wasm_b64: dict[str, str], headers: dict[str, str]
) -> None:
    response = client.post("/v1/tasks", json=hello(wasm_b64), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_policy_not_granted_to_the_token_gets_403(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    response = client.post("/v1/tasks", json=hello(wasm_b64, policy="strict"), headers=auth(BOB))
    assert response.status_code == 403


def test_task_the_policy_forbids_gets_403(client: TestClient, wasm_b64: dict[str, str]) -> None:
    body = hello(wasm_b64, policy="strict", tier="container")
    assert client.post("/v1/tasks", json=body, headers=auth(ALICE)).status_code == 403


def test_another_tokens_task_is_not_found(client: TestClient, wasm_b64: dict[str, str]) -> None:
    task_id = client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(ALICE)).json()["id"]
    assert client.get(f"/v1/tasks/{task_id}", headers=auth(BOB)).status_code == 404
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=auth(BOB)).status_code == 404


# Every route that takes a task id (checked against the app's routes below).
TASK_ENDPOINTS = [
    ("GET", "/v1/tasks/{task_id}", {}),
    ("GET", "/v1/tasks/{task_id}", {"wait": 5}),
    ("GET", "/v1/tasks/{task_id}/files/{file_name}", {}),
    ("POST", "/v1/tasks/{task_id}/cancel", {}),
]


def test_the_cross_token_tests_cover_every_route_that_takes_a_task_id(
    client: TestClient,
) -> None:
    routes = {(method, route.path.replace(":path", ""))
              for route in client.app.routes  # type: ignore[attr-defined]
              if "{task_id}" in getattr(route, "path", "")
              for method in getattr(route, "methods", ())}
    assert routes == {(method, path) for method, path, _ in TASK_ENDPOINTS}


@pytest.mark.parametrize(("method", "path", "params"), TASK_ENDPOINTS)
def test_every_task_endpoint_answers_404_for_another_tokens_task(
    client: TestClient, wasm_b64: dict[str, str], method: str, path: str,
    params: dict[str, object],
) -> None:
    task_id = client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(ALICE)).json()["id"]
    wait_final(client, task_id)
    url = path.format(task_id=task_id, file_name="result.json")
    stolen = client.request(method, url, params=params, headers=auth(BOB))
    assert stolen.status_code == 404
    assert b"hello" not in stolen.content and b"result.json" not in stolen.content
    owner = client.request(method, url, params=params, headers=auth(ALICE))
    assert owner.status_code == 200  # the same request by the owner: it exists


def test_another_token_cannot_cancel_a_queued_task(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    task_id = idle_client.post("/v1/tasks", json=hello(wasm_b64),
                               headers=auth(ALICE)).json()["id"]
    assert idle_client.post(f"/v1/tasks/{task_id}/cancel", headers=auth(BOB)).status_code == 404
    view = idle_client.get(f"/v1/tasks/{task_id}", headers=auth(ALICE)).json()
    assert (view["state"], view["cancel_requested"]) == ("queued", False)


def test_tasks_beyond_max_concurrent_get_429(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    codes = [idle_client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(BOB)).status_code
             for _ in range(3)]
    assert codes == [202, 202, 429]


def test_cpu_budget_spent_in_the_window_gets_429(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    burner = {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
              "resources": {"timeout": 0.5}}
    first = client.post("/v1/tasks", json=burner, headers=auth(CAROL))
    assert first.status_code == 202
    wait_final(client, first.json()["id"], CAROL)
    second = client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(CAROL))
    assert second.status_code == 429
    assert int(second.headers["retry-after"]) > 0


def test_oversized_body_gets_413(client: TestClient) -> None:
    body = {"kind": "python", "source": "x = 1\n" * 500_000}
    response = client.post("/v1/tasks", json=body, headers=auth(ALICE))
    assert response.status_code == 413


def test_oversized_chunked_body_without_length_gets_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"kind": "python", "source": "'
        for _ in range(64):
            yield b"#" * 65536
        yield b'"}'

    response = client.post("/v1/tasks", content=chunks(),
                           headers={**auth(ALICE), "Content-Type": "application/json"})
    assert response.status_code == 413


def test_oversized_upload_gets_413(client: TestClient) -> None:
    response = client.post("/v1/tasks/upload", files={"module": ("m.wasm", b"\0" * 3_000_000)},
                           headers=auth(ALICE))
    assert response.status_code == 413


def test_malformed_json_gets_422(client: TestClient) -> None:
    response = client.post("/v1/tasks", content=b'{"kind": "wasm", "module_b64": ',
                           headers={**auth(ALICE), "Content-Type": "application/json"})
    assert response.status_code == 422


def test_module_that_is_not_base64_gets_422(client: TestClient) -> None:
    body = {"kind": "wasm", "module_b64": "not base64!"}
    assert client.post("/v1/tasks", json=body, headers=auth(ALICE)).status_code == 422


@pytest.mark.parametrize(
    "name", ["..%2Fx", "%2Fetc%2Fpasswd", "a%2F..%2F..%2Fb", "%2E%2E", "a%5C..%5Cb"]
)
def test_path_tricks_in_file_names_get_400(
    client: TestClient, wasm_b64: dict[str, str], name: str
) -> None:
    task_id = client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(ALICE)).json()["id"]
    wait_final(client, task_id)
    response = client.get(f"/v1/tasks/{task_id}/files/{name}", headers=auth(ALICE))
    assert response.status_code == 400


def test_file_the_result_does_not_list_is_not_found(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    task_id = client.post("/v1/tasks", json=hello(wasm_b64), headers=auth(ALICE)).json()["id"]
    wait_final(client, task_id)
    response = client.get(f"/v1/tasks/{task_id}/files/input.json", headers=auth(ALICE))
    assert response.status_code == 404
