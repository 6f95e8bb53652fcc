"""The lean submit and poll routes answer as the FastAPI routes do, and hand them the rest."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from tests.service._support import ALICE, BOB, auth, wait_final
from wasmbox.models import AnomalyRule, Event, Metrics, Result, Status, TierName
from wasmbox.service import _api_fast, limits
from wasmbox.service.schemas import TaskView, WasmTaskRequest, view_json
from wasmbox.service.store import Record, State

# Parsed as JSON by FastAPI (a ``+json`` type), not taken by the lean path.
VENDOR_JSON = "application/vnd.wasmbox+json"
VOLATILE = ("id", "submitted_at", "started_at", "finished_at", "charged_s", "attempts")


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests the lean routes handed to FastAPI."""
    seen: list[str] = []
    real = _api_fast._Lean.fall_back

    async def spy(self: _api_fast._Lean, scope: Any, *args: Any) -> None:
        seen.append(scope["path"])
        await real(self, scope, *args)

    monkeypatch.setattr(_api_fast._Lean, "fall_back", spy)
    return seen


def _stable(view: dict[str, Any]) -> dict[str, Any]:
    result = view.get("result") or {}
    return {**{k: v for k, v in view.items() if k not in VOLATILE and k != "result"},
            "result": {k: v for k, v in result.items() if k in ("status", "output", "files")}}


def test_both_paths_give_the_same_answers(
    client: TestClient, wasm_b64: dict[str, str], fallbacks: list[str]
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    answers = []
    for content_type in ("application/json", VENDOR_JSON):
        headers = {**auth(ALICE), "Content-Type": content_type}
        submitted = client.post("/v1/tasks", headers=headers, json=body)
        waited = client.post("/v1/tasks", headers=headers, json=body, params={"wait": "10"})
        polled = client.get(f"/v1/tasks/{submitted.json()['id']}", headers=auth(ALICE),
                            params={"wait": "10"})
        answers.append([(r.status_code, r.headers["content-type"], _stable(r.json()))
                        for r in (submitted, waited, polled)])
    assert answers[0] == answers[1]
    assert answers[0][0][0] == 202 and answers[0][1][0] == 200
    assert fallbacks == ["/v1/tasks"] * 2  # only the vendor type's submissions went to FastAPI


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("post", "/v1/tasks", {"json": {"kind": "wasm"}}, 422),  # no module
    ("post", "/v1/tasks", {"content": b"{", "headers": {"Content-Type": "application/json"}},
     422),
    ("post", "/v1/tasks", {"content": b"[" * 100_000,  # too deep for the JSON parser
                           "headers": {"Content-Type": "application/json"}}, 400),
    ("post", "/v1/tasks", {"json": {"kind": "python", "source": "x"}, "params": {"wiat": 1}},
     422),
    ("post", "/v1/tasks", {"json": {"kind": "python", "source": "x"},
                           "params": {"wait": "-1"}}, 422),
    ("post", "/v1/tasks", {"json": {"kind": "python", "source": "x"},
                           "params": {"wait": "3601"}}, 422),
    ("get", "/v1/tasks/nope", {"params": {"wait": "1e1"}}, 404),  # FastAPI reads 1e1 too
    ("get", "/v1/tasks/nope", {"params": {"wait": "nan"}}, 422),
])
def test_what_the_lean_path_does_not_take_fastapi_answers(
    client: TestClient, fallbacks: list[str], method: str, path: str, kwargs: dict[str, Any],
    status: int,
) -> None:
    headers = {**auth(ALICE), **kwargs.pop("headers", {})}
    response = getattr(client, method)(path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert fallbacks == [path]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {ALICE}"}])
def test_no_valid_token_is_a_401_on_both_routes(
    client: TestClient, headers: dict[str, str], fallbacks: list[str]
) -> None:
    submitted = client.post("/v1/tasks", headers=headers, json={"kind": "python", "source": "x"})
    polled = client.get("/v1/tasks/anything", headers=headers)
    assert submitted.status_code == polled.status_code == 401
    assert submitted.headers["www-authenticate"] == "Bearer"
    assert len(fallbacks) == 2


def test_errors_of_admission_and_ownership_are_the_apps(
    client: TestClient, wasm_b64: dict[str, str], fallbacks: list[str]
) -> None:
    forbidden = client.post("/v1/tasks", headers=auth(BOB), json={
        "kind": "wasm", "module_b64": wasm_b64["hello"], "policy": "strict"})
    assert forbidden.status_code == 403
    assert forbidden.json() == {"detail": "policy 'strict' is not available to this token"}
    view = client.post("/v1/tasks", headers=auth(ALICE),
                       json={"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    assert client.get(f"/v1/tasks/{view['id']}", headers=auth(BOB)).json() == {
        "detail": "no such task"}
    assert wait_final(client, view["id"])["result"]["status"] == "completed"
    assert fallbacks == []


def test_methods_the_routes_do_not_have_are_405_as_before(client: TestClient) -> None:
    head = client.head("/v1/tasks/anything", headers=auth(ALICE))
    put = client.put("/v1/tasks/upload", headers=auth(ALICE))
    assert (head.status_code, head.headers["allow"]) == (405, "GET")
    assert (put.status_code, put.headers["allow"]) == (405, "POST")


def test_the_lean_answers_skip_the_middleware_stack_and_its_errors_do_not(
    client: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []
    real = limits.BodyLimit.__call__

    async def spy(self: limits.BodyLimit, scope: Any, *args: Any) -> None:
        seen.append((scope["method"], scope["path"]))
        await real(self, scope, *args)

    monkeypatch.setattr(limits.BodyLimit, "__call__", spy)
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    view = client.post("/v1/tasks", headers=auth(ALICE), json=body).json()
    path = f"/v1/tasks/{view['id']}"
    assert client.get(path, headers=auth(ALICE), params={"wait": "10"}).json()["final"]
    assert seen == []  # answered in front of the stack
    listed = client.get("/v1/tasks", headers=auth(ALICE))  # any other route: through it
    foreign = client.get(path, headers=auth(BOB))  # an error: answered by the stack
    over = client.post("/v1/tasks", headers=auth(BOB), json={**body, "policy": "strict"})
    assert (listed.status_code, foreign.status_code, over.status_code) == (200, 404, 403)
    assert foreign.json() == {"detail": "no such task"}
    assert seen == [("GET", "/v1/tasks"), ("GET", path), ("POST", "/v1/tasks")]


def test_a_body_longer_than_it_declared_is_413_not_read_to_its_end(
    make_client: Callable[..., TestClient],
) -> None:
    # The server hands over more body than Content-Length said (a framing bug or a hostile
    # peer): the front door stops at the body limit instead of reading it all.
    client = make_client(max_body_bytes=1024)
    task = b'{"kind": "python", "source": "x"}'
    chunks = [task, *[b" " * 512] * 8]  # valid JSON, 4 KiB past the limit
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks[1:])}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/tasks", "root_path": "",
             "query_string": b"", "http_version": "1.1", "scheme": "http",
             "headers": [(b"authorization", f"Bearer {ALICE}".encode()),
                         (b"content-type", b"application/json"),
                         (b"content-length", str(len(task)).encode())]}
    portal = client.portal
    assert portal is not None
    portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"detail": "request body larger than 1024 bytes"}
    assert len(chunks) > 1  # not read to its end
    assert client.get("/v1/tasks", headers=auth(ALICE)).json()["tasks"] == []


@pytest.mark.parametrize("query", ["wait=1%30", "wait=10&", "wait=10&wait=10"])
def test_a_wait_the_lean_path_does_not_read_itself_fastapi_reads(
    client: TestClient, wasm_b64: dict[str, str], fallbacks: list[str], query: str,
) -> None:
    view = client.post("/v1/tasks", headers=auth(ALICE),
                       json={"kind": "wasm", "module_b64": wasm_b64["hello"]}).json()
    polled = client.get(f"/v1/tasks/{view['id']}?{query}", headers=auth(ALICE))
    assert (polled.status_code, polled.json()["final"]) == (200, True)
    assert fallbacks == [f"/v1/tasks/{view['id']}"]


def test_a_long_poll_that_times_out_answers_the_view_as_it_is(
    idle_client: TestClient, fallbacks: list[str]
) -> None:
    body = {"kind": "python", "source": "x"}
    waited = idle_client.post("/v1/tasks", headers=auth(ALICE), json=body,
                              params={"wait": "0.05"})
    polled = idle_client.get(f"/v1/tasks/{waited.json()['id']}", headers=auth(ALICE),
                             params={"wait": "0.05"})
    assert (waited.status_code, polled.status_code) == (202, 200)
    assert waited.json()["state"] == polled.json()["state"] == "queued"
    assert fallbacks == []


_RESULT = Result(
    task_id="t", run_id="r", tier=TierName.WASM, status=Status.COMPLETED, exit_code=0,
    output={"a": [1, 2.5, None, "é"]}, files={"out/x.bin": b"\0" * 3}, stdout="hi\n",
    stdout_truncated=True, metrics=Metrics(wall_s=0.25, cpu_s=0.1, extra={"k": 1.0}),
    events=(Event(rule=AnomalyRule.FUEL_SPIKE, message="spin", at_s=0.1),),
    escalated_from=TierName.WASM, warnings=("lowered",),
)


@pytest.mark.parametrize("record", [
    Record(id="a", token="alice", policy="default", state=State.QUEUED,
           cancel_requested=False, attempts=0, result=None, error=None, submitted_at=1.0,
           started_at=None, finished_at=None, file_sizes={}),
    Record(id="b", token="alice", policy="strict", state=State.FINISHED,
           cancel_requested=True, attempts=2, result=_RESULT, error=None, submitted_at=1.0,
           started_at=1.5, finished_at=2.0, file_sizes={"out/x.bin": 3}, charged_s=0.5),
    Record(id="c", token="bob", policy="default", state=State.REJECTED,
           cancel_requested=False, attempts=1, result=None, error="no", submitted_at=1.0,
           started_at=None, finished_at=2.0, file_sizes={}, charged_s=0.0),
], ids=["queued", "finished", "rejected"])
def test_the_lean_view_is_the_fastapi_routes_view_byte_for_byte(record: Record) -> None:
    assert view_json(record) == TaskView.of(record).model_dump_json(by_alias=True).encode()


def test_task_ids_are_fresh_uuid4_hex() -> None:
    ids = {WasmTaskRequest(kind="wasm", module_b64="").to_task(b"\0asm").id
           for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(hex=i).version == 4 and uuid.UUID(hex=i).hex == i for i in ids)
