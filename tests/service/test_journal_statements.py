"""What the journal costs a task in SQLite statements, and the long-poll's order of work.

Each statement is a round trip through the GIL that the service's threads contend for: a
task is read with one statement (none once this store finished it), claimed and finished
with one each, and a batch of writes takes no savepoints unless one of its writes fails. A
long-poll registers its waiter before it reads the journal; it reads the task once before
waiting and once after, and not before when the task is its caller's and known not to be
final (queued or running). Admission counts a token's tasks in flight without a query. A
token that was seen owning a module is not asked again until the next purge.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from tests.service._support import ALICE, auth
from wasmbox import Result, Status, Task
from wasmbox.service import _journal_reads
from wasmbox.service._api_deps import _Waiters
from wasmbox.service._journal_reads import _recent, _recent_lock, remember_module
from wasmbox.service.store import Record, State, TaskStore

# Statements that frame a batch, not a task's own work.
FRAMING = ("BEGIN", "COMMIT", "PRAGMA")


@contextmanager
def statements(*dbs: sqlite3.Connection, framing: bool = False) -> Iterator[list[str]]:
    """The statements `dbs` run meanwhile, batch framing left out unless `framing`."""
    seen: list[str] = []
    for db in dbs:
        db.set_trace_callback(lambda sql: seen.append(sql.strip()))
    try:
        yield seen
    finally:
        for db in dbs:
            db.set_trace_callback(None)
        if not framing:
            seen[:] = [sql for sql in seen if not sql.upper().startswith(FRAMING)]


@contextmanager
def journal_in(tmp_path: Path) -> Iterator[TaskStore]:
    """The journal in `tmp_path`, opened (again: as after a restart, nothing in memory)."""
    journal = TaskStore(tmp_path / "tasks.db")
    try:
        yield journal
    finally:
        journal.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    with journal_in(tmp_path) as journal:
        yield journal


def hello(guests: dict[str, Path]) -> Task:
    return Task.wasm(guests["hello"].read_bytes())


def running(store: TaskStore, guests: dict[str, Path]) -> Task:
    """A hello task, journaled and claimed."""
    task = hello(guests)
    store.add("alice", "default", task)
    assert store.claim(task.id) is not None
    return task


def ended(task: Task, status: Status = Status.COMPLETED, **files: bytes) -> Result:
    return Result(task_id=task.id, run_id="r", tier="wasm", status=status, files=files)


def test_a_task_with_files_is_read_with_one_statement(
    store: TaskStore, guests: dict[str, Path], tmp_path: Path
) -> None:
    task = running(store, guests)
    files = {"a.txt": b"abc", "dir/b \"q\".bin": b"\0" * 7}
    store.finish(task.id, ended(task, **files), 0.1)
    with journal_in(tmp_path) as journal, statements(journal._reader()) as seen:
        record = journal.get(task.id)
    assert len(seen) == 1, seen
    assert record is not None and record.state is State.FINISHED
    assert record.file_sizes == {"a.txt": 3, "dir/b \"q\".bin": 7}
    assert store.get("no-such-task") is None


@pytest.mark.parametrize("cancel", [False, True], ids=["finished", "cancelled-while-running"])
def test_a_task_this_store_finished_is_read_without_a_statement(
    store: TaskStore, guests: dict[str, Path], tmp_path: Path, cancel: bool
) -> None:
    """The long-polls a result wakes read it from memory, exactly as the journal has it."""
    task = running(store, guests)
    if cancel:
        store.cancel(task.id)
    store.finish(task.id, ended(task, **{"a.txt": b"abc"}), 0.25)
    with statements(store._reader()) as seen:
        record = store.get(task.id)
    assert seen == []
    with journal_in(tmp_path) as journal:
        assert record == journal.get(task.id)
    assert record is not None and record.charged_s == 0.25 and record.attempts == 1


def test_final_records_kept_in_memory_are_bounded(
    store: TaskStore, guests: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_FINAL of them, oldest forgotten first, and none with a big result."""
    monkeypatch.setattr(_journal_reads, "MAX_FINAL", 2)
    monkeypatch.setattr(_journal_reads, "MAX_FINAL_RESULT_CHARS", 2000)
    tasks = [running(store, guests) for _ in range(4)]
    for task in tasks[:3]:
        store.finish(task.id, ended(task), 0.1)
    big = ended(tasks[3]).model_copy(update={"stdout": "x" * 2000})
    store.finish(tasks[3].id, big, 0.1)
    read: list[bool] = []
    for task in tasks:
        with statements(store._reader()) as seen:
            assert store.get(task.id) is not None
        read.append(bool(seen))
    assert read == [True, False, False, True]


def test_a_purge_forgets_the_final_records_read_from_memory(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = running(store, guests)
    store.finish(task.id, ended(task), 0.1)
    assert store.get(task.id) is not None
    later = time.time() + 60
    assert store.purge(later, 0, later) == 1
    assert store.get(task.id) is None


def test_a_task_is_claimed_and_finished_with_one_statement_each(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = hello(guests)
    store.add("alice", "default", task)
    assert task.module_bytes is not None  # among the recent ones (as once a task ran it):
    remember_module(hashlib.sha256(task.module_bytes).hexdigest(), task.module_bytes)
    with statements(store._db) as seen:
        claimed = store.claim(task.id)  # its module is among the recent ones
    assert len(seen) == 1, seen
    assert claimed is not None and claimed[1].module_bytes == task.module_bytes
    with statements(store._db) as seen:
        store.finish(task.id, ended(task), 0.1)
    assert len(seen) == 1, seen
    record = store.get(task.id)
    assert record is not None and record.state is State.FINISHED


def test_a_claim_reads_a_module_not_in_memory_from_the_journal(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = hello(guests)
    store.add("alice", "default", task)
    with _recent_lock:
        _recent.clear()  # as after a restart
    claimed = store.claim(task.id)
    assert claimed is not None and claimed[1].module_bytes == task.module_bytes


def test_a_cancel_requested_while_running_still_wins_over_the_result(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = running(store, guests)
    store.cancel(task.id)
    record = store.finish(task.id, ended(task, f=b"x"), 0.1)
    assert record is not None and record.result is not None
    assert record.result.status is Status.CANCELLED and record.file_sizes == {}
    # A second completion changes nothing: the first one stands.
    assert store.finish(task.id, ended(task, Status.FAILED), 0.1) is None


@contextmanager
def held(store: TaskStore) -> Iterator[None]:
    """The writer thread held inside a write meanwhile: what is queued forms its next batch."""
    holding, release = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        holding.set()
        release.wait(30)

    holder = store._queue_write(hold)
    assert holding.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.result(timeout=30)


def _batched(store: TaskStore, writes: list[Callable[[sqlite3.Connection], object]]
             ) -> list[object]:
    """Run `writes` as one batch (the writer is held until all are queued); each one's value
    or exception."""
    with held(store):
        futures = [store._queue_write(write) for write in writes]
    return [f.exception(timeout=30) or f.result() for f in futures]


def test_a_batch_takes_no_savepoints_unless_a_write_fails(store: TaskStore) -> None:
    def charge(n: int) -> Callable[[sqlite3.Connection], int]:
        def write(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO charges (token, finished_at, charge) VALUES ('t', ?, 1)",
                       (n,))
            return n
        return write

    def half_done(db: sqlite3.Connection) -> None:
        charge(100)(db)
        raise ValueError("half done")

    with statements(store._db) as seen:
        assert _batched(store, [charge(1), charge(2), charge(3)]) == [1, 2, 3]
    assert not [sql for sql in seen if "SAVEPOINT" in sql.upper()], seen
    # One failing write in a batch: it alone is undone, the others are stored once each.
    outcomes = _batched(store, [charge(4), half_done, charge(5)])
    assert outcomes[0] == 4 and outcomes[2] == 5 and isinstance(outcomes[1], ValueError)
    assert [at for at, _ in store.charges("t", 0)] == [1, 2, 3, 4, 5]


def _reads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Each journal read of a task from now on, and whether a waiter for it was registered
    when it was read."""
    st = client.app.state.wasmbox  # type: ignore[attr-defined]
    store, waiters = st.dispatcher.store, st.waiters
    real = store.get
    reads: list[tuple[str, bool]] = []

    def get(task_id: str) -> Record | None:
        reads.append((task_id, task_id in waiters._events))
        return real(task_id)

    monkeypatch.setattr(store, "get", get)
    return reads


def submit(client: TestClient, wasm_b64: dict[str, str], **params: float) -> Response:
    return client.post("/v1/tasks", headers=auth(ALICE), params=params,
                       json={"kind": "wasm", "module_b64": wasm_b64["hello"]})


def test_a_long_poll_registers_its_waiter_before_it_reads_the_task(
    idle_client: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submit(idle_client, wasm_b64).json()["id"]
    reads = _reads(idle_client, monkeypatch)
    view = idle_client.get(f"/v1/tasks/{task_id}", headers=auth(ALICE),
                           params={"wait": 0.2}).json()  # no worker: the wait runs out
    assert view["state"] == "queued"
    assert reads == [(task_id, True)]  # known not final: read once, after the wait


def test_a_long_poll_reads_another_tokens_task_before_waiting(
    idle_client: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submit(idle_client, wasm_b64).json()["id"]
    reads = _reads(idle_client, monkeypatch)
    assert idle_client.get(f"/v1/tasks/{task_id}", headers=auth("bob-secret"),
                           params={"wait": 5}).status_code == 404
    assert reads == [(task_id, True)]  # read before any wait: not found


def test_submit_and_wait_registers_its_waiter_before_it_reads_the_task(
    idle_client: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _reads(idle_client, monkeypatch)
    response = submit(idle_client, wasm_b64, wait=0.2)
    assert response.status_code == 202
    task_id = response.json()["id"]
    assert reads == [(task_id, True)]


def test_a_task_cancelled_after_a_worker_took_it_is_not_live(
    idle_client: TestClient, wasm_b64: dict[str, str]
) -> None:
    dispatcher = idle_client.app.state.wasmbox.dispatcher  # type: ignore[attr-defined]
    task_id = submit(idle_client, wasm_b64).json()["id"]
    assert dispatcher.live_token(task_id) == "alice"
    dispatcher._queued.discard(task_id)  # as a worker does just before it claims the task
    assert idle_client.post(f"/v1/tasks/{task_id}/cancel", headers=auth(ALICE)).json()["final"]
    assert dispatcher.live_token(task_id) is None  # a long-poll reads it, and sees it final


def test_a_poll_without_wait_reads_the_task_once(
    client: TestClient, wasm_b64: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submit(client, wasm_b64).json()["id"]
    reads = _reads(client, monkeypatch)
    assert client.get(f"/v1/tasks/{task_id}", headers=auth(ALICE)).status_code == 200
    assert len(reads) == 1
    # Another token's task is not found, and leaves no waiter behind.
    assert client.get(f"/v1/tasks/{task_id}", params={"wait": 1},
                      headers=auth("bob-secret")).status_code == 404
    assert task_id not in client.app.state.wasmbox.waiters._events  # type: ignore[attr-defined]


def test_a_module_its_owner_names_again_costs_no_query(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = hello(guests)
    store.add("alice", "default", task)
    assert task.module_bytes is not None
    sha = hashlib.sha256(task.module_bytes).hexdigest()
    assert store.module("alice", sha) == task.module_bytes
    with statements(store._reader()) as seen:
        assert store.module("alice", sha) == task.module_bytes
    assert seen == []
    assert store.module("bob", sha) is None  # another token is asked of the journal
    assert store.module("bob", sha) is None


def test_a_purge_forgets_which_token_owned_a_module(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = running(store, guests)
    assert task.module_bytes is not None
    sha = hashlib.sha256(task.module_bytes).hexdigest()
    store.finish(task.id, ended(task), 0.1)
    assert store.module("alice", sha) == task.module_bytes
    later = time.time() + 60
    assert store.purge(later, 0, later) == 1  # the task and its module are gone
    assert store.module("alice", sha) is None


def test_admission_counts_tasks_in_flight_without_a_query(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = {"kind": "wasm", "module_b64": wasm_b64["hello"]}
    first = make_client(workers=0)
    ids = [first.post("/v1/tasks", headers=auth("bob-secret"), json=body).json()["id"]
           for _ in range(2)]  # bob may have 2 queued or running
    first.__exit__(None, None, None)
    restarted = make_client(workers=0)  # both are queued again from the journal
    dispatcher = restarted.app.state.wasmbox.dispatcher  # type: ignore[attr-defined]
    assert [dispatcher.live_token(task_id) for task_id in ids] == ["bob", "bob"]

    def no_query(token: str) -> int:
        raise AssertionError("admission queried the journal")

    monkeypatch.setattr(dispatcher.store, "in_flight", no_query)
    assert restarted.post("/v1/tasks", headers=auth("bob-secret"), json=body).status_code == 429
    restarted.post(f"/v1/tasks/{ids[0]}/cancel", headers=auth("bob-secret"))
    assert restarted.post("/v1/tasks", headers=auth("bob-secret"), json=body).status_code == 202
    assert restarted.post("/v1/tasks", headers=auth("bob-secret"), json=body).status_code == 429


def test_a_claim_batched_with_durable_writes_does_not_wait_for_their_commit(
    store: TaskStore,
) -> None:
    """A write that needs no fsync (a claim) is answered before the durable writes of its
    batch are even run, let alone fsynced."""
    holding, release, durable_running, durable_go = (threading.Event() for _ in range(4))

    def hold(db: sqlite3.Connection) -> None:
        holding.set()
        release.wait(30)

    def durable(db: sqlite3.Connection) -> str:
        durable_running.set()
        durable_go.wait(30)
        return "durable"

    held = store._queue_write(hold)
    assert holding.wait(30)
    slow = store._queue_write(durable)
    quick = store._queue_write(lambda db: "claim", durable=False)
    release.set()
    try:
        assert quick.result(timeout=10) == "claim"
        assert not slow.done()
    finally:
        durable_go.set()
    assert held.result(timeout=30) is None and slow.result(timeout=30) == "durable"


def test_a_module_named_again_soon_is_not_upserted_again(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    """Tasks running one module take one statement each to journal, once it was stored."""
    store.add("alice", "default", hello(guests))
    with statements(store._db) as seen:
        store.add("alice", "default", hello(guests))
    assert len(seen) == 1 and seen[0].startswith("INSERT INTO tasks"), seen


def test_a_purge_keeps_a_module_submitted_since_it_was_last_stored(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    """Its submission time, not written when the module was not upserted again, is written
    before the purge looks at it."""
    first = running(store, guests)
    store.finish(first.id, ended(first), 0.1)
    stored = store.get(first.id)
    again = running(store, guests)
    store.finish(again.id, ended(again), 0.1)
    latest = store.get(again.id)
    assert stored is not None and latest is not None
    assert latest.submitted_at > stored.submitted_at
    cutoff = (stored.submitted_at + latest.submitted_at) / 2
    store.purge(0, 0, cutoff)  # no task is old enough; the module was used after the cutoff
    assert again.module_bytes is not None
    with _recent_lock:
        _recent.clear()
    assert store.module("alice", hashlib.sha256(again.module_bytes).hexdigest()) is not None


def test_a_module_deleted_by_a_purge_is_stored_again_by_its_next_task(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    task = running(store, guests)
    store.finish(task.id, ended(task), 0.1)
    later = time.time() + 60
    assert store.purge(later, 0, later) == 1  # the task and its module are gone
    again = hello(guests)
    store.add("alice", "default", again)
    with _recent_lock:
        _recent.clear()  # the module's bytes must come from the journal
    claimed = store.claim(again.id)
    assert claimed is not None and claimed[1].module_bytes == again.module_bytes


def test_the_results_of_one_batch_wake_the_event_loop_once() -> None:
    """Tasks signalled final together (one journal batch, on the writer thread) cost the
    loop one wake-up, and every one of their waiters wakes."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        wakeups = [0]
        real = loop.call_soon_threadsafe

        def counted(callback: Callable[..., object], *args: object) -> asyncio.Handle:
            wakeups[0] += 1
            return real(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        waiters = _Waiters(loop)
        events = [waiters.register(f"task-{i}") for i in range(5)]
        signal = threading.Thread(target=lambda: [waiters.notify(f"task-{i}") for i in range(5)])
        signal.start()
        signal.join()  # the loop is busy (here) while the batch's results are signalled
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), 30)
        return wakeups[0]

    assert asyncio.run(main()) == 1


def test_a_claim_alone_in_its_batch_is_one_statement_without_begin_or_commit(
    store: TaskStore, guests: dict[str, Path], tmp_path: Path
) -> None:
    """...and it is committed when the claim returns: another connection sees it running."""
    task = hello(guests)
    store.add("alice", "default", task)
    with statements(store._db, framing=True) as seen:
        assert store.claim(task.id) is not None
    # (Reading a module not in memory, switching the synchronous mode: not writes.)
    writes = [sql for sql in seen if not sql.startswith(("SELECT", "PRAGMA"))]
    assert len(writes) == 1 and writes[0].startswith("UPDATE tasks"), seen
    assert not store._db.in_transaction
    with sqlite3.connect(tmp_path / "tasks.db") as other:
        assert other.execute("SELECT state, attempts FROM tasks WHERE id = ?",
                             (task.id,)).fetchone() == ("running", 1)


def test_claims_batched_together_are_one_statement_each(
    store: TaskStore, guests: dict[str, Path]
) -> None:
    """Claims need no fsync and need not be atomic together: each commits itself."""
    tasks = [hello(guests) for _ in range(3)]
    for task in tasks:
        store.add("alice", "default", task)
    with ThreadPoolExecutor(3) as pool, statements(store._db, framing=True) as seen:
        with held(store):
            claims = [pool.submit(store.claim, task.id) for task in tasks]
            for _ in range(3000):  # until all three are queued behind the held write
                if store._writes.qsize() == 3:
                    break
                time.sleep(0.01)
        assert all(claim.result(timeout=30) is not None for claim in claims)
    # (Reading a module not in memory, switching the synchronous mode: not writes.)
    writes = [sql for sql in seen if not sql.startswith(("SELECT", "PRAGMA"))]
    assert writes[:2] == ["BEGIN IMMEDIATE", "COMMIT"], seen  # the held write's batch
    assert len(writes) == 5 and all(sql.startswith("UPDATE tasks") for sql in writes[2:]), seen
