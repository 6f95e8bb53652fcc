"""The service as users expect it (issue 17): command tasks, library-style resource strings,
listing the caller's tasks, submit-and-wait, the library's metrics, retention, ``serve --dev``
and offline API docs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, BOB, CAROL, auth, free_port, wait_final
from wasmbox.service import ServiceConfig


def post(client: TestClient, body: dict[str, Any], secret: str = ALICE,
         **params: Any) -> httpx.Response:
    return client.post("/v1/tasks", json=body, headers=auth(secret), params=params)


# --- 1. task kinds and resources as in the library -------------------------------------------


def test_resources_accept_the_library_strings(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"],
            "resources": {"timeout": "2s", "memory": "64M", "output_bytes": "1MiB",
                          "stdout_bytes": 4096, "disk": "10MB"}}
    response = post(idle_client, body)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("resources", [
    {"memory": "lots"}, {"timeout": "soon"}, {"memory": "0M"}, {"timeout": "0s"},
    {"memory": "9" * 5000}, {"timeout": -1}, {"memory": 1.5},
])
def test_bad_resource_strings_are_422(
    idle_client: TestClient, wasm_b64: dict[str, str], resources: dict[str, Any]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"], "resources": resources}
    response = post(idle_client, body)
    assert response.status_code == 422, response.text


def test_openapi_says_sizes_are_numbers_or_strings(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    memory = schemas["ResourcesRequest"]["properties"]["memory"]
    kinds: set[str] = set()
    pending = [memory]
    while pending:
        alt = pending.pop()
        pending += alt.get("anyOf", [])
        kinds |= {alt["type"]} if "type" in alt else set()
    assert {"integer", "string", "null"} <= kinds
    assert "CommandTaskRequest" in schemas
    assert schemas["CommandTaskRequest"]["properties"]["argv"]["minItems"] == 1


def test_command_task_is_accepted_as_argv(idle_client: TestClient) -> None:
    response = post(idle_client, {"kind": "command", "argv": ["/bin/sh", "-c", "echo hi"]})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("body", [
    {"kind": "command", "argv": []},
    {"kind": "command", "argv": "ls -la"},
    {"kind": "command"},
    {"kind": "command", "argv": ["ls"], "args": ["-la"]},
])
def test_malformed_command_tasks_are_422(idle_client: TestClient, body: dict[str, Any]) -> None:
    assert post(idle_client, body).status_code == 422


def test_command_under_a_wasm_only_policy_is_403(idle_client: TestClient) -> None:
    response = post(idle_client, {"kind": "command", "argv": ["/bin/true"], "policy": "strict"})
    assert response.status_code == 403, response.text


def _container_available() -> bool:
    if shutil.which("crun") is None and shutil.which("runc") is None:
        return False
    from wasmbox.tiers.container import ContainerTier

    tier = ContainerTier()
    try:
        return tier.availability().ok
    finally:
        tier.close()


def test_command_task_runs_in_a_container(client: TestClient) -> None:
    if not _container_available():
        pytest.skip("the container tier is not available here")
    response = post(client, {"kind": "command", "argv": ["/bin/sh", "-c", "echo hi"]})
    assert response.status_code == 202, response.text
    final = wait_final(client, response.json()["id"])
    assert final["state"] == "finished", final
    assert final["result"]["tier"] == "container"
    assert final["result"]["stdout"] == "hi\n"


# --- 2. listing and submit-and-wait ------------------------------------------------------------


def test_list_shows_only_the_callers_tasks_newest_first(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    mine = [post(idle_client, body).json()["id"] for _ in range(3)]
    theirs = post(idle_client, body, BOB).json()["id"]
    listed = idle_client.get("/v1/tasks", headers=auth(ALICE)).json()
    assert [t["id"] for t in listed["tasks"]] == mine[::-1]
    assert listed["next_cursor"] is None
    bobs = idle_client.get("/v1/tasks", headers=auth(BOB)).json()
    assert [t["id"] for t in bobs["tasks"]] == [theirs]
    assert idle_client.get("/v1/tasks").status_code == 401


def test_list_pages_with_a_cursor_and_filters_by_state(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    ids = [post(idle_client, body).json()["id"] for _ in range(5)]
    idle_client.post(f"/v1/tasks/{ids[0]}/cancel", headers=auth(ALICE))
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = idle_client.get("/v1/tasks", params=params, headers=auth(ALICE)).json()
        assert len(page["tasks"]) <= 2
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = idle_client.get("/v1/tasks", params={"state": "queued"}, headers=auth(ALICE))
    assert [t["id"] for t in queued.json()["tasks"]] == ids[:0:-1]
    finished = idle_client.get("/v1/tasks", params={"state": "finished"}, headers=auth(ALICE))
    assert [t["id"] for t in finished.json()["tasks"]] == [ids[0]]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"cursor": 0},
                                    {"cursor": "x"}, {"state": "exploded"}])
def test_list_bounds_its_parameters(idle_client: TestClient, params: dict[str, Any]) -> None:
    response = idle_client.get("/v1/tasks", params=params, headers=auth(ALICE))
    assert response.status_code == 422


def test_tasks_path_allows_get_and_post(idle_client: TestClient) -> None:
    response = idle_client.delete("/v1/tasks", headers=auth(ALICE))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    upload = idle_client.get("/v1/tasks/upload/x", headers=auth(ALICE))
    assert upload.status_code in (404, 405)


@pytest.mark.parametrize(("method", "path"), [("get", "/v1/tasks"), ("get", "/v1/tasks/x"),
                                              ("post", "/v1/tasks")])
def test_unknown_query_parameters_are_422(
    idle_client: TestClient, wasm_b64: dict[str, str], method: str, path: str
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    kwargs: dict[str, Any] = {"json": body} if method == "post" else {}
    response = idle_client.request(method.upper(), path, params={"wiat": 10},
                                   headers=auth(ALICE), **kwargs)
    assert response.status_code == 422, response.text
    assert "wiat" in response.text


def test_submit_and_wait_returns_the_final_result_with_200(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["json_transform"], "input": {"xs": [1, 2]}}
    response = post(client, body, wait=20)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["final"] and view["result"]["output"] == {"sum": 3, "count": 2, "max": 2}


def test_submit_and_wait_answers_202_when_time_is_up(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    response = post(idle_client, {"kind": "wasm", "module_b64": wasm_b64["hello"]}, wait=0.2)
    assert response.status_code == 202
    assert response.json()["state"] == "queued"


def test_submit_wait_is_bounded_by_max_wait(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    idle = make_client(workers=0, max_wait=0.2)
    started = time.monotonic()
    response = post(idle, {"kind": "wasm", "module_b64": wasm_b64["hello"]}, wait=60)
    assert response.status_code == 202
    # Loose on purpose (0.2 s allowed, 45 s tolerated): a wait that ignored max_wait would
    # hold this request the whole 60 s.
    assert time.monotonic() - started < 45


# --- 3. metrics ----------------------------------------------------------------------------------


def test_metrics_expose_library_and_service_metrics_without_clashes(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    view = post(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    wait_final(client, view["id"])
    text = client.get("/metrics").text
    assert re.search(r'^wasmbox_runs_total\{status="completed",tier="wasm"\} [1-9]', text, re.M)
    assert "wasmbox_run_seconds_bucket" in text
    assert "wasmbox_service_tasks_finished_total" in text
    declared = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(declared) == len(set(declared)), sorted(declared)


# --- 4. retention ----------------------------------------------------------------------------


def test_finished_tasks_and_files_are_deleted_after_the_retention(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    client = make_client(retention="1s")
    view = post(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    final = wait_final(client, view["id"])
    assert "result.json" in final["result"]["files"]
    for _ in range(200):
        if client.get(f"/v1/tasks/{view['id']}", headers=auth(ALICE)).status_code == 404:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the finished task was never deleted")
    file = client.get(f"/v1/tasks/{view['id']}/files/result.json", headers=auth(ALICE))
    assert file.status_code == 404
    import sqlite3

    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("SELECT count(*) FROM files").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


def test_retention_keeps_unfinished_tasks(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    idle = make_client(workers=0, retention="0.1s")
    view = post(idle, {"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    time.sleep(0.5)  # several sweeps
    assert idle.get(f"/v1/tasks/{view['id']}", headers=auth(ALICE)).json()["state"] == "queued"


def test_deleting_a_task_does_not_give_its_cpu_budget_back(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    # carol's budget is 0.05 s in a 600 s window: one run spends it, and a sweep that deleted
    # the run's charge with the task would let her run again at once.
    client = make_client(retention="0.2s")
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    first = post(client, body, CAROL)
    assert first.status_code == 202, first.text
    wait_final(client, first.json()["id"], CAROL)
    for _ in range(200):
        if client.get(f"/v1/tasks/{first.json()['id']}", headers=auth(CAROL)).status_code == 404:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the finished task was never deleted")
    assert post(client, body, CAROL).status_code == 429


@pytest.mark.parametrize(("text", "seconds"), [("7d", 7 * 86400.0), ("12h", 43200.0), (60, 60.0)])
def test_retention_setting_reads_days(tmp_path: Path, text: Any, seconds: float) -> None:
    config = ServiceConfig.from_dict({"service": {"retention": text}}, base=tmp_path)
    assert config.service.retention == seconds


def test_default_retention_is_seven_days() -> None:
    assert ServiceConfig().service.retention == 7 * 86400.0


# --- 5. serve --dev ----------------------------------------------------------------------------


def test_dev_mode_refuses_a_non_loopback_host() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wasmbox.service", "--dev", "--host", "0.0.0.0",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "loopback" in proc.stderr
    assert "token" not in proc.stdout


def test_dev_mode_prints_a_working_token_once(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasmbox.service", "--dev", "--port", str(port),
         "--db", str(tmp_path / "dev.db")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"token: (\S+)", line)
        assert match, line
        token = match.group(1)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                response = httpx.get(f"{url}/v1/policies", headers=auth(token), timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError("the dev service did not come up")
        assert response.status_code == 200
        assert response.json() == {"policies": ["default"]}
        assert httpx.get(f"{url}/v1/policies", headers=auth("guess")).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert token not in out  # printed once


# --- 6. offline docs ---------------------------------------------------------------------------


def test_docs_reference_only_local_assets_which_are_served(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)""", page.text)
    assert urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        assert client.get(url).status_code == 200, url
    assert "http://" not in page.text and "https://" not in page.text
    assert "/docs/assets/swagger-ui-bundle.js" in urls



def test_serve_shortens_the_gil_switch_interval_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    import wasmbox.service as service

    seen: list[float] = []
    monkeypatch.setattr(uvicorn, "run", lambda *_a, **_k: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    service.serve("127.0.0.1", 0, dev=True, db=tmp_path / "dev.db")
    assert seen == [service.SWITCH_INTERVAL_S]
    assert before > service.SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before
