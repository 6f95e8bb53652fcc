"""Threat: a task (or a failure around it) that kills a service worker thread.

A worker that dies leaves its task ``running`` forever, holding its token's concurrency slot
and budget, and the queue behind it stalls: one hostile submission becomes a denial of service
for everyone. Results a guest can produce that break the host's own serialisation -- JSON
nested past the parser's depth limit, a string with a lone surrogate -- and any exception in
the journal or the notification path must end the task (``rejected``, or a stand-in
``output_rejected`` result) with a reason, release its slot, and leave the worker serving the
next task. Every test runs one worker, so "the next task completes" proves that worker lives.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service import conftest as service
from tests.service._support import ALICE, BOB, auth
from wasmbox.service.store import TaskStore

# The service fixtures (an in-process service, built guests as base64), used here too.
make_client = service.make_client
shared_module_cache = service.shared_module_cache
wasm_b64 = service.wasm_b64

# Generous: the first Python task of a session compiles the interpreter (minutes on a busy box).
WAIT_S = 300.0


def submit(client: TestClient, body: dict[str, Any], secret: str = ALICE) -> str:
    response = client.post("/v1/tasks", json=body, headers=auth(secret))
    assert response.status_code == 202, response.text
    task_id: str = response.json()["id"]
    return task_id


def final_view(client: TestClient, task_id: str, secret: str = ALICE) -> dict[str, Any]:
    """Long-poll until final; fails (instead of hanging) if the task never gets there."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        response = client.get(f"/v1/tasks/{task_id}", params={"wait": 5}, headers=auth(secret))
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        if view["final"]:
            return view
    raise AssertionError(f"task {task_id} never became final: {view}")


def assert_next_task_completes(client: TestClient, wasm_b64: dict[str, str]) -> None:
    task_id = submit(client, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    view = final_view(client, task_id)
    assert view["result"]["status"] == "completed", view


@pytest.fixture
def one_worker(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(workers=1)


def nested_python(depth: int) -> str:
    return ("def main(inp):\n    x = []\n"
            f"    for _ in range({depth}):\n        x = [x]\n    return x\n")


@pytest.mark.parametrize("depth", [220, 300])
def test_python_result_nested_past_the_json_limits_does_not_kill_the_worker(
    one_worker: TestClient, wasm_b64: dict[str, str], depth: int
) -> None:
    task_id = submit(one_worker, {"kind": "python", "source": nested_python(depth),
                                  "tier": "wasm"})
    view = final_view(one_worker, task_id)
    assert view["state"] in ("finished", "rejected")
    if view["state"] == "finished":
        assert view["result"]["status"] == "output_rejected"
        assert view["result"]["output"] is None
    assert_next_task_completes(one_worker, wasm_b64)


@pytest.mark.parametrize("args", [["nested", "230"], ["nested", "300"], ["surrogate"]])
def test_c_guest_result_the_host_cannot_store_does_not_kill_the_worker(
    one_worker: TestClient, wasm_b64: dict[str, str], args: list[str]
) -> None:
    task_id = submit(one_worker, {"kind": "wasm", "module_b64": wasm_b64["unstorable_result"],
                                  "args": args})
    view = final_view(one_worker, task_id)
    assert view["state"] in ("finished", "rejected")
    if view["state"] == "finished":
        assert view["result"]["status"] == "output_rejected"
        assert "result.json" not in view["result"]["files"]
    assert_next_task_completes(one_worker, wasm_b64)


def test_echoed_lone_surrogate_in_the_output_does_not_kill_the_worker(
    one_worker: TestClient, wasm_b64: dict[str, str]
) -> None:
    # The input is refused at the door (it cannot be journaled), so the guest makes it itself.
    source = "def main(inp):\n    return {'s': chr(0xD800)}\n"
    view = final_view(one_worker, submit(one_worker, {"kind": "python", "source": source,
                                                      "tier": "wasm"}))
    assert view["final"] and view["result"]["status"] != "completed"
    assert_next_task_completes(one_worker, wasm_b64)


def test_a_failing_journal_write_rejects_the_task_and_the_worker_goes_on(
    one_worker: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_finish = TaskStore.finish
    failures: list[str] = []

    def finish_failing_once(self: TaskStore, task_id: str, *args: Any) -> Any:
        if not failures:
            failures.append(task_id)
            raise sqlite3.OperationalError("disk I/O error")
        return real_finish(self, task_id, *args)

    monkeypatch.setattr(TaskStore, "finish", finish_failing_once)
    task_id = submit(one_worker, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    view = final_view(one_worker, task_id)
    assert failures == [task_id]
    assert view["state"] == "rejected"
    assert "internal error" in view["error"] and "disk I/O error" in view["error"]
    assert_next_task_completes(one_worker, wasm_b64)


def test_a_failing_final_notification_does_not_kill_the_worker(
    one_worker: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = one_worker.app.state.wasmbox.dispatcher  # type: ignore[attr-defined]
    notify = dispatcher.on_final
    calls: list[str] = []

    def notify_failing_once(task_id: str) -> None:
        calls.append(task_id)
        if len(calls) == 1:
            raise RuntimeError("event loop is closed")
        notify(task_id)

    monkeypatch.setattr(dispatcher, "on_final", notify_failing_once)
    first = submit(one_worker, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    assert_next_task_completes(one_worker, wasm_b64)
    assert calls[0] == first


def test_a_failing_notification_does_not_fail_a_cancel_that_was_recorded(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idle = make_client(workers=0)
    dispatcher = idle.app.state.wasmbox.dispatcher  # type: ignore[attr-defined]

    def notify_failing(task_id: str) -> None:
        raise RuntimeError("event loop is closed")

    monkeypatch.setattr(dispatcher, "on_final", notify_failing)
    task_id = submit(idle, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    response = idle.post(f"/v1/tasks/{task_id}/cancel", headers=auth(ALICE))
    assert response.status_code == 200
    assert response.json()["result"]["status"] == "cancelled"


def test_a_journaled_task_that_cannot_be_read_back_is_rejected_and_the_queue_moves(
    one_worker: TestClient, wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    # Hold the one worker, then corrupt the queued task's journal row behind the service.
    slow = submit(one_worker, {"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                               "resources": {"timeout": 1}})
    corrupt = submit(one_worker, {"kind": "wasm", "module_b64": wasm_b64["hello"]})
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        db.execute("UPDATE tasks SET task_json = '{' WHERE id = ? AND state = 'queued'",
                   (corrupt,))
    assert final_view(one_worker, slow)["result"]["status"] == "timeout"
    view = final_view(one_worker, corrupt)
    assert view["state"] == "rejected"
    assert "cannot be read" in view["error"]
    assert_next_task_completes(one_worker, wasm_b64)


def test_an_unstorable_result_releases_the_tokens_slot(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=1)
    body = {"kind": "wasm", "module_b64": wasm_b64["unstorable_result"],
            "args": ["nested", "300"]}
    # bob may have two tasks in flight: both must end, so two more are admitted.
    for task_id in [submit(client, body, BOB), submit(client, body, BOB)]:
        assert final_view(client, task_id, BOB)["final"]
    codes = [client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["hello"]},
                         headers=auth(BOB)).status_code for _ in range(2)]
    assert codes == [202, 202]

