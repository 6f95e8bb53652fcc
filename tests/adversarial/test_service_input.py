"""Threat: malformed client input that the service accepts and then chokes on.

Text that is not valid Unicode (a lone surrogate, legal in JSON as ``"\\ud800"`` but not
encodable as UTF-8) used to reach the journal or the host's own parsers and come back as an
HTTP 500; bytes that are not a WebAssembly module were acknowledged with 202 and only refused
later, after taking a queue slot and a worker. Every such request must get a 4xx with a clear,
typed reason (``InputRejected`` / ``ModuleRejected``) before anything is journaled; a request
body must be judged by its declared length before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from tests.service import conftest as service
from tests.service._support import ALICE, BOB, auth, config_data
from wasmbox.errors import ModuleRejected
from wasmbox.service import ServiceConfig, create_app
from wasmbox.service.dispatcher import validate_module

# The service fixtures (an in-process service, built guests as base64), used here too.
client = service.client
idle_client = service.idle_client
make_client = service.make_client
shared_module_cache = service.shared_module_cache
wasm_b64 = service.wasm_b64

LONE_SURROGATE = "\ud800"


def post_raw(client: TestClient, body: dict[str, Any], secret: str = ALICE) -> Any:
    """Post JSON as the bytes a client would send (surrogates as \\u escapes)."""
    return client.post("/v1/tasks", content=json.dumps(body).encode("ascii"),
                       headers={**auth(secret), "Content-Type": "application/json"})


def journaled(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        (count,) = db.execute("SELECT count(*) FROM tasks").fetchone()
    return int(count)


@pytest.mark.parametrize(("field", "body"), [
    ("source", {"kind": "python", "source": f"x = '{LONE_SURROGATE}'\n"}),
    ("env", {"kind": "python", "source": "x = 1\n", "env": {"A": LONE_SURROGATE}}),
    ("args", {"kind": "wasm", "module_b64": "AGFzbQEAAAA=", "args": [LONE_SURROGATE]}),
])
def test_a_lone_surrogate_in_task_text_is_400_input_rejected(
    idle_client: TestClient, tmp_path: Path, field: str, body: dict[str, Any]
) -> None:
    response = post_raw(idle_client, body)
    assert response.status_code == 400, (field, response.text)
    assert response.json()["detail"].startswith("InputRejected: ")
    assert "not valid Unicode" in response.json()["detail"]
    assert journaled(tmp_path) == 0


def test_a_lone_surrogate_in_the_input_is_400_input_rejected(
    idle_client: TestClient, tmp_path: Path, wasm_b64: dict[str, str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"], "input": {"k": LONE_SURROGATE}}
    response = post_raw(idle_client, body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("InputRejected: ")
    assert journaled(tmp_path) == 0


@pytest.mark.parametrize("module", [
    b"\0asm",  # the magic and nothing else
    b"\0asm\1\0\0\0\1\5",  # a section cut short
    b"/etc/passwd",  # a host path is bytes like any other, never opened
    b"",
])
def test_bytes_that_are_not_a_module_are_400_at_submission(
    idle_client: TestClient, tmp_path: Path, module: bytes
) -> None:
    body = {"kind": "wasm", "module_b64": base64.b64encode(module).decode()}
    response = idle_client.post("/v1/tasks", json=body, headers=auth(ALICE))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("ModuleRejected: ")
    assert journaled(tmp_path) == 0


def test_a_truncated_module_upload_is_400_and_takes_no_slot(
    idle_client: TestClient, guests: dict[str, Path], tmp_path: Path
) -> None:
    truncated = guests["hello"].read_bytes()[:-40]
    for _ in range(3):  # bob has two slots: none of these may take one
        response = idle_client.post("/v1/tasks/upload", files={"module": ("m.wasm", truncated)},
                                    headers=auth(BOB))
        assert response.status_code == 400
        assert "ModuleRejected" in response.json()["detail"]
    assert journaled(tmp_path) == 0


def test_module_validation_is_bounded_in_size() -> None:
    module = b"\0asm\1\0\0\0"
    validate_module(module, max_bytes=8)
    with pytest.raises(ModuleRejected, match="over 7"):
        validate_module(module, max_bytes=7)


# --- declared Content-Length -------------------------------------------------------------

def call_raw(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[str]]:
    """One POST /v1/tasks straight into the ASGI app; returns (status, what was received)."""
    received: list[str] = []
    sent: list[Message] = []

    async def receive() -> Message:
        received.append("body")
        return {"type": "http.request", "body": b'{"kind": "python", "source": "x"}',
                "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/tasks", "raw_path": b"/v1/tasks",
             "query_string": b"", "root_path": "", "server": ("testserver", 80),
             "client": ("127.0.0.1", 1234),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {ALICE}".encode()), *headers]}
    with suppress(AttributeError):  # not started: a handler that runs finds no state
        asyncio.run(app(scope, receive, send))
    return sent[0]["status"], received


@pytest.fixture
def raw_app(tmp_path: Path) -> Any:
    """The real app (not started: the answer must come before any handler runs)."""
    return create_app(ServiceConfig.from_dict(config_data(tmp_path / "tasks.db")))


@pytest.mark.parametrize("length", [b"2097153", b"1000000000", b"9" * 5000],
                         ids=["limit-plus-one", "1e9", "5000-digits"])
def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
    raw_app: Any, length: bytes
) -> None:
    status, received = call_raw(raw_app, [(b"content-length", length)])
    assert status == 413
    assert received == []


@pytest.mark.parametrize("length", [b"abc", b"-1", b"+5", b"1e9", b" 5", b"0x10", b""])
def test_a_declared_length_that_is_not_a_number_is_400_before_the_body_is_read(
    raw_app: Any, length: bytes
) -> None:
    status, received = call_raw(raw_app, [(b"content-length", length)])
    assert status == 400
    assert received == []


def test_conflicting_declared_lengths_are_400_before_the_body_is_read(raw_app: Any) -> None:
    status, received = call_raw(raw_app, [(b"content-length", b"10"),
                                          (b"content-length", b"999999999")])
    assert status == 400
    assert received == []


def test_a_declared_length_within_the_limit_reaches_the_app(raw_app: Any) -> None:
    # The control for the tests above: the same request with an honest length is read.
    status, received = call_raw(raw_app, [(b"content-length", b"33")])
    assert received == ["body"]
    assert status not in (400, 413)


@pytest.mark.parametrize("body", [
    {"kind": "python", "source": "x = 1\n", "entry": LONE_SURROGATE},  # a constrained string
    {"kind": "python", "source": "x = 1\n", "tier": LONE_SURROGATE},  # an enum
    {"kind": LONE_SURROGATE},  # the discriminator
    {"kind": "python", "source": "x = 1\n", LONE_SURROGATE: 1},  # an unknown field's name
])
def test_a_422_that_echoes_a_lone_surrogate_still_renders(
    idle_client: TestClient, body: dict[str, Any]
) -> None:
    response = post_raw(idle_client, body)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_a_422_for_a_nan_input_still_renders(idle_client: TestClient) -> None:
    response = idle_client.post(
        "/v1/tasks", content=b'{"kind": "python", "source": "x", "entry": NaN}',
        headers={**auth(ALICE), "Content-Type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "http://127.0.0.1:9/schema.json"},
        {"$ref": "file:///etc/passwd"},
        {"properties": {"a": {"$ref": "https://example.invalid/x#/defs/y"}}},
        {"type": "string", "pattern": "(?<=lookbehind)x"},  # RE2 cannot run it: refused
    ],
    ids=["http", "file", "nested-remote", "non-linear-regex"],
)
def test_a_client_schema_that_names_the_outside_world_is_a_400_at_submit(
    idle_client: TestClient, wasm_b64: dict[str, str], schema: dict[str, Any]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"], "output_schema": schema}
    response = idle_client.post("/v1/tasks", json=body, headers=auth(ALICE))
    assert response.status_code == 400, response.text
    assert "InputRejected" in response.text or "schema" in response.text
    listed = idle_client.get("/v1/tasks", headers=auth(ALICE))
    assert listed.status_code in (200, 404, 405)  # nothing journaled either way
