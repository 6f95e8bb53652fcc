"""Durability under group commit: a 202 is sent only after its task's row is committed.

Submissions share commits (one writer thread, one fsync per batch), so the promise to check is
the order: commit first, answer second. Each test leaves a window in which a service that
answered early would be caught -- a commit held up inside SQLite, another process holding the
journal's write lock, a SIGKILL right after a burst of 202s -- and every id a client was told
was accepted must be in the journal afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, ServiceProcess, auth, wait_final, write_config

# How long a commit (or the journal's lock) is held up: ample for an early answer to arrive.
HOLD_S = 1.5
BURST = 32


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()


def journaled(db: Path, ids: list[str]) -> set[str]:
    """Which of `ids` the journal file holds (read by a connection of the test's own)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    return {row[0] for row in rows}


def test_the_202_waits_for_the_commit_of_its_row(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(workers=0)  # nothing runs: the only commit is the submission's
    store = client.app.state.wasmbox.dispatcher.store  # type: ignore[attr-defined]
    answered: list[str] = []
    seen_at_commit: list[list[str]] = []
    armed = threading.Event()
    armed.set()

    def trace(statement: str) -> None:
        # Called on the writer thread as each statement starts, i.e. before COMMIT runs:
        # hold it up, then note which answers the client already has.
        if armed.is_set() and statement.strip().upper() == "COMMIT":
            time.sleep(HOLD_S)
            seen_at_commit.append(list(answered))

    # Never unset while a commit may run: the writer holds the connection inside `trace`.
    store._db.set_trace_callback(trace)
    response = client.post("/v1/tasks", headers=auth(ALICE),
                           json={"kind": "wasm", "module_b64": wasm_b64["hello"]})
    assert response.status_code == 202, response.text
    answered.append(response.json()["id"])
    for _ in range(100):  # an early answer arrives before the commit ends: wait for it
        if seen_at_commit:
            break
        time.sleep(0.1)
    armed.clear()
    assert seen_at_commit, "the submission was not committed"
    assert seen_at_commit[0] == [], "the 202 reached the client before its row was committed"


def test_no_task_is_answered_while_the_journal_cannot_commit(
    tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    config = write_config(tmp_path, workers=0)
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    answered: list[str] = []
    lock = threading.Lock()

    def submit(client: httpx.Client) -> None:
        try:
            response = client.post("/v1/tasks", json=body)
        except httpx.TransportError:
            return  # the service was killed before it answered: nothing was promised
        if response.status_code == 202:
            with lock:
                answered.append(response.json()["id"])

    # Another process holds the journal's write lock: nothing can commit until it lets go.
    holder = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30) as client, \
                ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(submit, client)
            time.sleep(HOLD_S)
            with lock:
                promised = list(answered)
            services[0].kill()  # while the lock is still held: no commit can have happened
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert promised == [] or journaled(tmp_path / "tasks.db", promised) == set(promised), (
        "tasks were answered 202 but never committed")
    assert promised == [], "a 202 was sent while the journal could not commit"


def test_every_task_answered_202_survives_sigkill(
    tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    config = write_config(tmp_path, workers=1)
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30,
                      limits=httpx.Limits(max_connections=BURST)) as client, \
            ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(lambda _i: client.post("/v1/tasks", json=body), range(BURST)))
    services[0].kill()  # the moment the last 202 is in: no graceful shutdown runs
    assert [r.status_code for r in responses] == [202] * BURST
    accepted = [r.json()["id"] for r in responses]

    assert journaled(tmp_path / "tasks.db", accepted) == set(accepted)
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[1].url, headers=auth(ALICE), timeout=30) as client:
        for task_id in accepted:
            assert client.get(f"/v1/tasks/{task_id}").status_code == 200


def test_every_task_answered_202_by_digest_runs_after_sigkill(
    tmp_path: Path, services: list[ServiceProcess], wasm_b64: dict[str, str]
) -> None:
    """Tasks naming a module stored moments before (which do not store it again) are
    journaled with it: after a SIGKILL right behind their 202s, each one runs."""
    config = write_config(tmp_path, workers=0)
    services.append(ServiceProcess(config, tmp_path / "service.log"))
    with httpx.Client(base_url=services[0].url, headers=auth(ALICE), timeout=30,
                      limits=httpx.Limits(max_connections=BURST)) as client, \
            ThreadPoolExecutor(BURST) as pool:
        first = client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["hello"]})
        by_digest = {"kind": "wasm", "module_sha256": hashlib.sha256(
            base64.b64decode(wasm_b64["hello"])).hexdigest()}
        responses = [first, *pool.map(lambda _i: client.post("/v1/tasks", json=by_digest),
                                      range(BURST))]
    services[0].kill()
    assert [r.status_code for r in responses] == [202] * (BURST + 1)

    services.append(ServiceProcess(write_config(tmp_path, workers=1),
                                   tmp_path / "service.log"))
    with httpx.Client(base_url=services[1].url, headers=auth(ALICE), timeout=30) as client:
        views = [wait_final(client, r.json()["id"]) for r in responses]
    assert [v["result"]["status"] for v in views] == ["completed"] * (BURST + 1)
