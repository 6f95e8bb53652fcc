"""The group-committing journal: a write whose caller gave up still lands, and the writer
thread serves the next one; one failing write is undone alone; closing commits what is
queued; the read connections of threads that ended do not pile up; a result's commit that
fails (the worker did not wait for it) still ends the task."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, auth
from wasmbox import Task
from wasmbox.service.store import State, TaskStore


def hello(guests: dict[str, Path]) -> Task:
    return Task.wasm(guests["hello"].read_bytes())


def test_a_submission_whose_waiter_was_cancelled_is_still_journaled(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    store = TaskStore(tmp_path / "tasks.db")
    try:
        task = hello(guests)

        async def give_up() -> None:  # what a client disconnecting mid-submit does
            waiting = asyncio.wrap_future(store.add_future("alice", "default", task))
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run(give_up())
        later = hello(guests)
        # The writer still serves (bounded: a dead writer would leave this waiting forever).
        store.add_future("alice", "default", later).result(timeout=60)
        for task_id in (task.id, later.id):
            record = store.get(task_id)
            assert record is not None and record.state is State.QUEUED
    finally:
        store.close()


def test_one_failing_write_is_undone_alone(tmp_path: Path, guests: dict[str, Path]) -> None:
    store = TaskStore(tmp_path / "tasks.db")
    try:
        task = hello(guests)
        store.add("alice", "default", task)
        with pytest.raises(sqlite3.IntegrityError):  # the same id again
            store.add("alice", "default", task)
        other = hello(guests)
        store.add("alice", "default", other)
        assert store.in_flight("alice") == 2
    finally:
        store.close()


def test_closing_commits_what_is_queued(tmp_path: Path, guests: dict[str, Path]) -> None:
    store = TaskStore(tmp_path / "tasks.db")
    tasks = [hello(guests) for _ in range(20)]
    futures = [store.add_future("alice", "default", t) for t in tasks]
    store.close()
    assert all(f.result(timeout=0).id == t.id for f, t in zip(futures, tasks, strict=True))
    reopened = TaskStore(tmp_path / "tasks.db")
    try:
        assert reopened.in_flight("alice") == 20
        with sqlite3.connect(tmp_path / "tasks.db") as db:  # one module row for 20 tasks
            assert db.execute("SELECT count(*) FROM modules").fetchone() == (1,)
    finally:
        reopened.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.add("alice", "default", hello(guests))


def test_read_connections_of_ended_threads_are_closed(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    store = TaskStore(tmp_path / "tasks.db")
    try:
        task = hello(guests)
        store.add("alice", "default", task)
        me = psutil.Process()

        def read_once() -> None:
            assert store.get(task.id) is not None

        def short_lived_readers(count: int) -> None:
            for _ in range(count):
                thread = threading.Thread(target=read_once)
                thread.start()
                thread.join()

        short_lived_readers(5)
        before = me.num_fds()
        short_lived_readers(60)  # a server's thread pool retiring and starting threads
        assert me.num_fds() - before < 10
    finally:
        store.close()


def test_a_failing_write_leaves_nothing_behind_alone_or_in_a_batch(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.db")

    def half_done(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO charges (token, finished_at, charge) VALUES ('x', 1, 1)")
        raise ValueError("half done")

    try:
        with pytest.raises(ValueError, match="half done"):
            store._write(half_done)  # alone in its batch: no savepoint, the batch rolled back
        futures = [store._queue_write(half_done) for _ in range(5)]  # batched, mostly
        for future in futures:
            with pytest.raises(ValueError, match="half done"):
                future.result(timeout=10)
        assert store.charges("x", 0) == []
        store.add("alice", "default", Task.python("x = 1"))
        assert store.in_flight("alice") == 1  # the journal still takes writes
    finally:
        store.close()


def test_a_result_whose_commit_fails_rejects_the_task_and_wakes_its_waiters(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers do not wait for a result's commit: its failure arrives on the writer thread.
    def finish_failing(self: TaskStore, task_id: str, result: object, charge: float,
                       done: Callable[[Future[object]], None] | None = None) -> None:
        def fail(db: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        assert done is not None
        self._queue_write(fail).add_done_callback(done)

    client = make_client(workers=1)
    monkeypatch.setattr(TaskStore, "finish", finish_failing)
    task_id = client.post("/v1/tasks", headers=auth(ALICE), json={
        "kind": "wasm", "module_b64": wasm_b64["hello"]}).json()["id"]
    started = time.monotonic()
    view = client.get(f"/v1/tasks/{task_id}", headers=auth(ALICE), params={"wait": 15}).json()
    assert time.monotonic() - started < 10  # woken, not timed out
    assert view["state"] == "rejected", view
    assert view["error"] == "internal error: OperationalError: disk I/O error"
