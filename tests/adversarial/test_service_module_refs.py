"""Threat: a client that names another client's module by its SHA-256 (``module_sha256``).

A task may name its module by digest instead of sending it, if the service holds it. Were the
lookup by digest alone, any token could run -- and learn the existence of -- a module another
token uploaded (a private binary, or one holding embedded secrets), just by knowing or
guessing its hash, and a forged digest could pair a name with bytes it does not hash to. A
token can only name modules it submitted itself; the digest is computed by the service from
the bytes, never taken from the client; an unknown or foreign digest is the same 400.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

from fastapi.testclient import TestClient

from tests.service import conftest as service
from tests.service._support import ALICE, BOB, auth, wait_final

client = service.client
make_client = service.make_client
shared_module_cache = service.shared_module_cache
wasm_b64 = service.wasm_b64


def digest(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def test_a_token_cannot_run_a_module_another_token_submitted(
    client: TestClient, wasm_b64: dict[str, str]
) -> None:
    first = client.post("/v1/tasks", headers=auth(ALICE),
                        json={"kind": "wasm", "module_b64": wasm_b64["secret_leak"]})
    assert first.status_code == 202
    wait_final(client, first.json()["id"])
    by_ref = {"kind": "wasm", "module_sha256": digest(wasm_b64["secret_leak"])}
    assert client.post("/v1/tasks", headers=auth(ALICE), json=by_ref).status_code == 202

    stolen = client.post("/v1/tasks", headers=auth(BOB), json=by_ref)
    never = client.post("/v1/tasks", headers=auth(BOB), json={
        "kind": "wasm", "module_sha256": hashlib.sha256(b"never submitted").hexdigest()})
    # Foreign and unknown look the same: the answer says nothing about other tokens.
    assert stolen.status_code == never.status_code == 400
    assert stolen.json() == never.json()


def test_the_digest_is_the_services_own_not_the_clients(
    client: TestClient, wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    view = client.post("/v1/tasks", headers=auth(ALICE),
                       json={"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    wait_final(client, view["id"])
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        (stored,) = db.execute("SELECT module_sha256 FROM tasks WHERE id = ?",
                               (view["id"],)).fetchone()
        (data,) = db.execute("SELECT data FROM modules WHERE sha256 = ?", (stored,)).fetchone()
    assert stored == hashlib.sha256(bytes(data)).hexdigest() == digest(wasm_b64["hello"])
