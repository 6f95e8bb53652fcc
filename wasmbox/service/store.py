"""The durable task journal (SQLite, WAL): a task is committed here before it is acknowledged.

States: ``queued`` -> ``running`` -> ``finished`` (a `Result`, possibly CANCELLED) or
``rejected`` (the host refused to run it: a policy violation, a bad module). A task found
``running`` at start-up was interrupted by a crash and is queued again.

Quota accounting: a task holds a *reservation* (its largest possible charge) while it is
queued or running; when it ends the reservation is replaced by its *charge*, which rejected
runs pay too. Retention (`purge`) deletes finished tasks and their files; the charges of
those still inside a quota window move to a small ``charges`` table, so deleting a task never
gives its budget back early. A module is stored once (by its SHA-256) however many tasks run
it, and kept until no queued or running task needs it and it was last submitted before the
module retention. Everything stored is checked to read back, so no task's row can break a
reader.

Writes are group-committed (see `TaskStore`): a write returns only once it is durable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from wasmbox.errors import InputRejected
from wasmbox.lifecycle import Closeable
from wasmbox.models import Result, Status, Task


class State(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


FINAL = frozenset({State.FINISHED, State.REJECTED})

# Reasons stored for rejected tasks are cut here: an exception's text can be huge.
MAX_ERROR_CHARS = 2000
# Writes committed in one transaction at most (one fsync for all of them).
MAX_BATCH = 256
# How long a write or read waits for another process holding the journal's lock.
BUSY_TIMEOUT_S = 5.0
T = TypeVar("T")
log = logging.getLogger("wasmbox.service")
UNSTORABLE = "the result could not be stored (nested too deep, or text that is not valid Unicode)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    policy TEXT NOT NULL,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    task_json TEXT NOT NULL,
    module BLOB,
    result_json TEXT,
    error TEXT,
    cpu_s REAL,
    reserved_s REAL NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_by_token_state ON tasks (token, state);
CREATE INDEX IF NOT EXISTS tasks_by_token_finish ON tasks (token, finished_at);
CREATE TABLE IF NOT EXISTS charges (
    token TEXT NOT NULL,
    finished_at REAL NOT NULL,
    charge REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_token ON charges (token, finished_at);
CREATE TABLE IF NOT EXISTS modules (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    task_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (task_id, name)
);
"""


@dataclass(frozen=True, slots=True)
class Record:
    """What the journal knows about one task (without its code or file contents)."""

    id: str
    token: str
    policy: str
    state: State
    cancel_requested: bool
    attempts: int
    result: Result | None
    error: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    file_sizes: dict[str, int]
    charged_s: float | None = None
    reserved_s: float = 0.0


class TaskStore(Closeable):
    """Thread-safe journal of tasks and their results in one SQLite file.

    Writes are group-committed: every thread's write joins the next transaction of one
    writer thread, which commits (one fsync, ``synchronous=FULL``) and only then returns to
    each caller, so "returned" still means "durable" and concurrent writers share the fsync.
    One failing write is rolled back alone (a savepoint); a failing commit fails the whole
    batch, none of it stored. Reads use a connection per thread (WAL: readers never wait for
    the writer).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged task survives power loss too, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._synced = True
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        if "reserved_s" not in columns:  # a journal written before reservations existed
            self._db.execute("ALTER TABLE tasks ADD COLUMN reserved_s REAL NOT NULL DEFAULT 0")
        if "module_sha256" not in columns:  # ... or before modules were stored once each
            self._db.execute("ALTER TABLE tasks ADD COLUMN module_sha256 TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS tasks_by_module ON tasks (module_sha256)"
                         " WHERE module_sha256 IS NOT NULL")
        self._local = threading.local()
        self._readers: dict[threading.Thread, sqlite3.Connection] = {}
        self._gate = threading.Lock()  # orders queueing a write against closing
        self._closed = False
        self._writes: queue.SimpleQueue[_Write[Any] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="wasmbox-journal",
                                        daemon=True)
        self._writer.start()

    # -- group commit -------------------------------------------------------------------

    def _write(self, op: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run `op` in the next committed batch; return its value once the batch is durable.

        `durable=False`: committed without the fsync when no other write of its batch needs
        one (it survives the process being killed, not the machine losing power).
        """
        return self._queue_write(op, durable=durable).result()

    def _queue_write(
        self, op: Callable[[sqlite3.Connection], T],
        after: Callable[[bool], None] | None = None, durable: bool = True,
    ) -> Future[T]:
        """Queue `op` for the next batch; the future resolves once the batch is durable.

        `after(committed)` runs on the writer thread once the batch's fate is known, before
        the future resolves (True: `op` succeeded and its batch committed).
        """
        future: Future[T] = Future()
        # Running from the start: cancelling it (a client that went away while its
        # submission was awaited) cannot stop the write or fail the writer's set_result.
        future.set_running_or_notify_cancel()
        with self._gate:
            if self._closed:
                raise sqlite3.ProgrammingError("the task journal is closed")
            self._writes.put(_Write(op, future, after, durable))
        return future

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = self._writes.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Write[Any]]) -> None:
        db = self._db
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            synced = any(write.durable for write in batch)
            if synced != self._synced:  # WAL: FULL fsyncs at each commit, NORMAL does not
                db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
                self._synced = synced
            db.execute("BEGIN IMMEDIATE")
            for write in batch:
                db.execute("SAVEPOINT one")
                try:
                    value = write.op(db)
                except Exception as exc:  # this write alone is undone
                    db.execute("ROLLBACK TO one")
                    db.execute("RELEASE one")
                    outcomes.append((write.future, False, exc))
                else:
                    db.execute("RELEASE one")
                    outcomes.append((write.future, True, value))
            db.execute("COMMIT")
        except BaseException as exc:  # nothing of the batch is stored
            with suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            for write in batch:
                _after(write, False)
                write.future.set_exception(exc)
            return
        # Only now, after the commit's fsync, does any caller hear back.
        for write, (future, ok, value) in zip(batch, outcomes, strict=True):
            _after(write, ok)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            with self._gate:
                if self._closed:
                    raise sqlite3.ProgrammingError("the task journal is closed")
                # Threads come and go (the server's thread pool retires idle ones): the
                # connections of those that ended are closed here, so they do not pile up.
                for thread in [t for t in self._readers if not t.is_alive()]:
                    self._readers.pop(thread).close()
                db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None,
                                     timeout=BUSY_TIMEOUT_S)
                self._readers[threading.current_thread()] = db
            db.execute("PRAGMA query_only=ON")
            self._local.db = db
        return db

    # -- writes -------------------------------------------------------------------------

    def add(
        self, token: str, policy: str, task: Task, reserved_s: float = 0.0,
        module_sha256: str | None = None,
    ) -> Record:
        """Journal a new queued task holding `reserved_s` of its token's budget
        (`module_sha256`: the digest of its module if known, computed here otherwise).

        Returns its record once it is durable; raises `InputRejected` for a task that cannot
        be journaled (text that is not valid Unicode, say).
        """
        return self.add_future(token, policy, task, reserved_s, module_sha256).result()

    def add_future(
        self, token: str, policy: str, task: Task, reserved_s: float = 0.0,
        module_sha256: str | None = None, after: Callable[[bool], None] | None = None,
    ) -> Future[Record]:
        """`add` without waiting: the future gives the record once it is durable; `after`
        runs on the writer thread first (with True if it was committed)."""
        try:
            task_json = task.model_dump_json(exclude={"module_bytes"})
            task_json.encode("utf-8")
        except (ValueError, RecursionError) as exc:
            raise InputRejected(
                "the task cannot be stored: its input or text is nested too deep or is not "
                "valid Unicode (a lone surrogate?)"
            ) from exc
        now = time.time()
        module = task.module_bytes
        digest = None if module is None else (
            module_sha256 or hashlib.sha256(module).hexdigest())

        record = Record(
            id=task.id, token=token, policy=policy, state=State.QUEUED, cancel_requested=False,
            attempts=0, result=None, error=None, submitted_at=now, started_at=None,
            finished_at=None, file_sizes={}, charged_s=None, reserved_s=reserved_s,
        )

        def insert(db: sqlite3.Connection) -> Record:
            if digest is not None:  # stored once however many tasks run it
                db.execute(
                    "INSERT INTO modules (sha256, data, last_used) VALUES (?, ?, ?)"
                    " ON CONFLICT (sha256) DO UPDATE SET last_used = excluded.last_used",
                    (digest, module, now),
                )
            db.execute(
                "INSERT INTO tasks (id, token, policy, state, task_json, module_sha256,"
                " reserved_s, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task.id, token, policy, State.QUEUED, task_json, digest, reserved_s, now),
            )
            return record

        return self._queue_write(insert, after)

    def claim(self, task_id: str) -> tuple[str, Task] | None:
        """Mark a queued task running and return (policy name, task); None if not queued."""

        def claim(db: sqlite3.Connection) -> tuple[str, str, bytes | None] | None:
            cur = db.execute(
                "UPDATE tasks SET state = ?, started_at = ?, attempts = attempts + 1"
                " WHERE id = ? AND state = ?",
                (State.RUNNING, time.time(), task_id, State.QUEUED),
            )
            if cur.rowcount != 1:
                return None
            row: tuple[str, str, bytes | None] = db.execute(
                "SELECT policy, task_json, coalesce(module, (SELECT data FROM modules"
                " WHERE sha256 = tasks.module_sha256)) FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            return row

        # Not fsynced on its own: a claim lost with the machine's power only undercounts the
        # task's attempts by one; the next durable commit (its finish, say) covers it too.
        found = self._write(claim, durable=False)
        if found is None:
            return None
        policy, task_json, module = found
        data = json.loads(task_json)
        if module is not None:
            data["module_bytes"] = bytes(module)
        return policy, Task.model_validate(data)

    def finish(self, task_id: str, result: Result, charge: float) -> Record | None:
        """Record the result of a running task and its charge (seconds against its budget).

        A pending cancel turns it into CANCELLED. A result that could not be read back (JSON
        nested past the parser's limit, a lone surrogate in a string or a file name) is stored
        as OUTPUT_REJECTED without the guest's data, so one hostile result breaks no reader.
        """
        stored = _storable(result)  # serialised here, not on the writer thread

        def finish(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT cancel_requested FROM tasks WHERE id = ? AND state = ?",
                (task_id, State.RUNNING),
            ).fetchone()
            if row is None:
                return False  # a duplicate completion: the first one stands
            final, result_json = stored
            if row[0]:
                final, result_json = _storable(cancelled(
                    result, "cancelled while running" if result.status is Status.CANCELLED
                    else f"cancelled while running (it ended {result.status})"))
            db.execute(
                "UPDATE tasks SET state = ?, result_json = ?, cpu_s = ?, finished_at = ?,"
                " module = NULL WHERE id = ?",
                (State.FINISHED, result_json, charge, time.time(), task_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO files (task_id, name, data) VALUES (?, ?, ?)",
                [(task_id, name, data) for name, data in final.files.items()],
            )
            return True

        if not self._write(finish):
            return None
        return self.get(task_id)

    def reject(self, task_id: str, error: str, charge: float = 0.0) -> Record | None:
        """Record that the host refused to run a claimed task; the time it took is charged."""
        if len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + "..."
        error = error.encode("utf-8", "replace").decode("utf-8")

        def reject(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE tasks SET state = ?, error = ?, cpu_s = ?, finished_at = ?, module = NULL"
                " WHERE id = ? AND state IN (?, ?)",
                (State.REJECTED, error, charge, time.time(), task_id, State.RUNNING,
                 State.QUEUED),
            )

        self._write(reject)
        return self.get(task_id)

    def cancel(self, task_id: str) -> Record | None:
        """Cancel a queued task now, or flag a running one to be marked cancelled at its end."""

        def cancel(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT state, task_json FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                return False
            if row[0] == State.QUEUED:
                task_json = json.loads(row[1])
                result = Result(task_id=task_id, run_id="", tier=task_json["tier"],
                                status=Status.CANCELLED, reason="cancelled before it ran")
                db.execute(
                    "UPDATE tasks SET state = ?, cancel_requested = 1, result_json = ?,"
                    " cpu_s = 0, finished_at = ?, module = NULL WHERE id = ?",
                    (State.FINISHED, result.model_dump_json(), time.time(), task_id),
                )
            elif row[0] == State.RUNNING:
                db.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
            return True

        if not self._write(cancel):
            return None
        return self.get(task_id)

    def purge(
        self, finished_before: float, keep_charges_after: float,
        modules_before: float | None = None,
    ) -> int:
        """Delete final tasks that ended before `finished_before`, and their files; their
        charges that ended after `keep_charges_after` are kept for quota accounting, older
        kept charges are dropped. Modules last submitted before `modules_before` (default:
        `finished_before`) that no queued or running task needs are deleted too. Returns how
        many tasks were deleted."""
        if modules_before is None:
            modules_before = finished_before

        def purge(db: sqlite3.Connection) -> int:
            old = "state IN (?, ?) AND finished_at < ?"
            params = (State.FINISHED, State.REJECTED, finished_before)
            db.execute(
                "INSERT INTO charges (token, finished_at, charge) SELECT token, finished_at,"
                f" coalesce(cpu_s, 0) FROM tasks WHERE {old} AND finished_at > ?",
                (*params, keep_charges_after),
            )
            db.execute(
                f"DELETE FROM files WHERE task_id IN (SELECT id FROM tasks WHERE {old})", params
            )
            deleted = db.execute(f"DELETE FROM tasks WHERE {old}", params).rowcount
            db.execute("DELETE FROM charges WHERE finished_at <= ?", (keep_charges_after,))
            db.execute(
                "DELETE FROM modules WHERE last_used < ? AND NOT EXISTS (SELECT 1 FROM tasks"
                " WHERE module_sha256 = modules.sha256 AND state IN (?, ?))",
                (modules_before, State.QUEUED, State.RUNNING),
            )
            return int(deleted)

        return self._write(purge)

    def recover(self, max_attempts: int) -> list[str]:
        """Queue again every task a crash interrupted; return all queued ids, oldest first.

        A task that was already started `max_attempts` times is rejected instead, so one
        task that kills the service cannot do it forever; it is charged its reservation.
        """

        def recover(db: sqlite3.Connection) -> list[str]:
            db.execute(
                "UPDATE tasks SET state = ?, error = ?, finished_at = ?, module = NULL,"
                " cpu_s = reserved_s WHERE state = ? AND attempts >= ?",
                (State.REJECTED, f"the service stopped during each of {max_attempts} attempts",
                 time.time(), State.RUNNING, max_attempts),
            )
            db.execute("UPDATE tasks SET state = ? WHERE state = ?",
                       (State.QUEUED, State.RUNNING))
            rows = db.execute(
                "SELECT id FROM tasks WHERE state = ? ORDER BY submitted_at", (State.QUEUED,)
            ).fetchall()
            return [r[0] for r in rows]

        return self._write(recover)

    # -- reads --------------------------------------------------------------------------

    def get(self, task_id: str) -> Record | None:
        """The task's record, or None if no such task was accepted."""
        db = self._reader()
        db.execute("BEGIN")  # the row and its files from one snapshot
        try:
            row = db.execute(
                "SELECT id, token, policy, state, cancel_requested, attempts, result_json,"
                " error, submitted_at, started_at, finished_at, cpu_s, reserved_s"
                " FROM tasks WHERE id = ?",
                (task_id,),
            ).fetchone()
            sizes = {} if row is None else dict(db.execute(
                "SELECT name, length(data) FROM files WHERE task_id = ?", (task_id,)
            ).fetchall())
        finally:
            db.execute("COMMIT")
        if row is None:
            return None
        result, error = None, row[7]
        if row[6] is not None:
            try:
                result = Result.model_validate_json(row[6])
            except ValueError:  # written before `finish` checked that results read back
                error = UNSTORABLE
        return Record(
            id=row[0], token=row[1], policy=row[2], state=State(row[3]),
            cancel_requested=bool(row[4]), attempts=row[5], result=result, error=error,
            submitted_at=row[8], started_at=row[9], finished_at=row[10], file_sizes=sizes,
            charged_s=row[11], reserved_s=row[12],
        )

    def module(self, token: str, sha256: str) -> bytes | None:
        """The module of SHA-256 `sha256` if `token` submitted it and it is still kept."""
        row = self._reader().execute(
            "SELECT data FROM modules WHERE sha256 = ? AND EXISTS (SELECT 1 FROM tasks"
            " WHERE module_sha256 = ? AND token = ?)", (sha256, sha256, token),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def file(self, task_id: str, name: str) -> bytes | None:
        """One output file of a finished task, by its exact name."""
        row = self._reader().execute(
            "SELECT data FROM files WHERE task_id = ? AND name = ?", (task_id, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def in_flight(self, token: str) -> int:
        """How many of the token's tasks are queued or running."""
        (count,) = self._reader().execute(
            "SELECT count(*) FROM tasks WHERE token = ? AND state IN (?, ?)",
            (token, State.QUEUED, State.RUNNING),
        ).fetchone()
        return int(count)

    def charges(self, token: str, since: float) -> list[tuple[float, float]]:
        """(finished_at, charge) of the token's runs that ended after `since`, oldest first
        (purged tasks included)."""
        rows = self._reader().execute(
            "SELECT finished_at, coalesce(cpu_s, 0) FROM tasks"
            " WHERE token = ? AND finished_at > ?"
            " UNION ALL SELECT finished_at, charge FROM charges"
            " WHERE token = ? AND finished_at > ? ORDER BY 1",
            (token, since, token, since),
        ).fetchall()
        return [(float(at), float(charge)) for at, charge in rows]

    def page(
        self, token: str, state: State | None, limit: int, cursor: int | None
    ) -> tuple[list[Record], int | None]:
        """Up to `limit` of the token's tasks, newest first, after `cursor` (a position from
        a previous page); returns them and the cursor of the next page (None: no more)."""
        query = "SELECT rowid, id FROM tasks WHERE token = ?"
        params: list[object] = [token]
        if state is not None:
            query += " AND state = ?"
            params.append(state)
        if cursor is not None:
            query += " AND rowid < ?"
            params.append(cursor)
        query += " ORDER BY rowid DESC LIMIT ?"
        params.append(limit + 1)
        rows = self._reader().execute(query, params).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        records = [r for r in (self.get(task_id) for _, task_id in rows) if r is not None]
        return records, (int(rows[-1][0]) if more else None)

    def reserved(self, token: str) -> float:
        """Seconds of the token's budget held by its queued and running tasks."""
        (held,) = self._reader().execute(
            "SELECT coalesce(sum(reserved_s), 0) FROM tasks"
            " WHERE token = ? AND state IN (?, ?)",
            (token, State.QUEUED, State.RUNNING),
        ).fetchone()
        return float(held)

    def _release(self) -> None:
        """Commit what is queued, stop the writer, close every connection."""
        with self._gate:
            self._closed = True
            self._writes.put(None)
        self._writer.join()
        self._db.close()
        for db in self._readers.values():
            db.close()


@dataclass(frozen=True, slots=True)
class _Write(Generic[T]):
    """One write waiting for the next batch, and whom to tell when it is durable."""

    op: Callable[[sqlite3.Connection], T]
    future: Future[T]
    after: Callable[[bool], None] | None = None
    durable: bool = True


def _after(write: _Write[Any], committed: bool) -> None:
    if write.after is not None:
        try:
            write.after(committed)
        except Exception:  # the writer outlives any follow-up's failure
            log.exception("a journal write's follow-up failed")


def _storable(result: Result) -> tuple[Result, str]:
    """The result and its JSON, as `get` will read it back; a stand-in if it cannot be."""
    try:
        for name in result.files:
            name.encode("utf-8")
        text = result.model_dump_json(exclude={"files"})
        Result.model_validate_json(text)
        return result, text
    except (ValueError, RecursionError):
        pass
    status = Status.CANCELLED if result.status is Status.CANCELLED else Status.OUTPUT_REJECTED
    stand_in = result.model_copy(update={
        "status": status, "reason": UNSTORABLE, "output": None, "files": {}, "stdout": "",
        "stderr": "", "trap": None, "events": (), "escalation_reason": None,
    })
    return stand_in, stand_in.model_dump_json(exclude={"files"})


def cancelled(result: Result, reason: str) -> Result:
    """The result of a cancelled run: its metrics stay (they are charged), its outputs go."""
    return result.model_copy(
        update={"status": Status.CANCELLED, "reason": reason, "output": None, "files": {}}
    )
