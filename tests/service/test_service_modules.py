"""Modules by reference: a wasm task names a module its token submitted before by SHA-256."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from tests.service._support import ALICE, auth, wait_final


def digest(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def test_a_module_sent_once_runs_again_by_its_digest(
    client: TestClient, wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["json_transform"], "input": {"xs": [1]}}
    first = client.post("/v1/tasks", headers=auth(ALICE), json=body).json()
    ref = {"kind": "wasm", "module_sha256": digest(wasm_b64["json_transform"]),
           "input": {"xs": [1, 2, 3]}}
    second = client.post("/v1/tasks", headers=auth(ALICE), json=ref)
    assert second.status_code == 202, second.text
    waited = client.post("/v1/tasks", headers=auth(ALICE), json=ref, params={"wait": 10})
    assert waited.status_code in (200, 202)
    for view in (wait_final(client, first["id"]), wait_final(client, second.json()["id"]),
                 wait_final(client, waited.json()["id"])):
        assert view["result"]["status"] == "completed"
    assert wait_final(client, second.json()["id"])["result"]["output"]["sum"] == 6
    with sqlite3.connect(tmp_path / "tasks.db") as db:  # three tasks, one stored module
        assert db.execute("SELECT count(*) FROM modules").fetchone() == (1,)


def test_exactly_one_of_module_b64_and_module_sha256(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    both = {"kind": "wasm", "module_b64": wasm_b64["hello"],
            "module_sha256": digest(wasm_b64["hello"])}
    for body in (both, {"kind": "wasm"}, {"kind": "wasm", "module_sha256": "ABC"}):
        assert client.post("/v1/tasks", headers=auth(ALICE), json=body).status_code == 422


def test_an_unknown_digest_is_a_400_naming_the_fix(client: TestClient) -> None:
    response = client.post("/v1/tasks", headers=auth(ALICE), json={
        "kind": "wasm", "module_sha256": "0" * 64})
    assert response.status_code == 400
    assert "module_b64" in response.json()["detail"]


def test_modules_no_task_needs_are_swept_after_module_retention(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    client = make_client(module_retention=0.2)
    view = client.post("/v1/tasks", headers=auth(ALICE),
                       json={"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    wait_final(client, view["id"])
    ref = {"kind": "wasm", "module_sha256": digest(wasm_b64["hello"])}
    for _ in range(200):  # the sweep runs every module_retention / 4 (bounded wait)
        response = client.post("/v1/tasks", headers=auth(ALICE), json=ref)
        if response.status_code == 400:
            break
        assert response.status_code == 202
        wait_final(client, response.json()["id"])
        time.sleep(0.5)
    else:
        raise AssertionError("the module was never swept")
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("SELECT count(*) FROM modules").fetchone() == (0,)
