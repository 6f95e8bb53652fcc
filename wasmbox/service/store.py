"""The durable task journal (SQLite, WAL): a task is committed here before it is acknowledged.

States: ``queued`` -> ``running`` -> ``finished`` (a `Result`, possibly CANCELLED) or
``rejected`` (the host refused to run it: a policy violation, a bad module). A task found
``running`` at start-up was interrupted by a crash and is queued again.

Quota accounting: a task holds a *reservation* (its largest possible charge) while it is
queued or running; when it ends the reservation is replaced by its *charge*, which rejected
runs pay too. Retention (`purge`) deletes finished tasks and their files; the charges of
those still inside a quota window move to a small ``charges`` table, so deleting a task never
gives its budget back early. Everything stored is checked to read back, so no task's row
can break a reader.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

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
    """Thread-safe journal of tasks and their results in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged task survives power loss too, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
            if "reserved_s" not in columns:  # a journal written before reservations existed
                self._db.execute(
                    "ALTER TABLE tasks ADD COLUMN reserved_s REAL NOT NULL DEFAULT 0"
                )

    def add(self, token: str, policy: str, task: Task, reserved_s: float = 0.0) -> None:
        """Journal a new queued task holding `reserved_s` of its token's budget.

        Returns once it is durable; raises `InputRejected` for a task that cannot be
        journaled (text that is not valid Unicode, say).
        """
        try:
            task_json = task.model_dump_json(exclude={"module_bytes"})
            task_json.encode("utf-8")
        except (ValueError, RecursionError) as exc:
            raise InputRejected(
                "the task cannot be stored: its input or text is nested too deep or is not "
                "valid Unicode (a lone surrogate?)"
            ) from exc
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (id, token, policy, state, task_json, module, reserved_s,"
                " submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task.id, token, policy, State.QUEUED, task_json, task.module_bytes, reserved_s,
                 time.time()),
            )

    def claim(self, task_id: str) -> tuple[str, Task] | None:
        """Mark a queued task running and return (policy name, task); None if not queued."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE tasks SET state = ?, started_at = ?, attempts = attempts + 1"
                " WHERE id = ? AND state = ?",
                (State.RUNNING, time.time(), task_id, State.QUEUED),
            )
            if cur.rowcount != 1:
                return None
            policy, task_json, module = self._db.execute(
                "SELECT policy, task_json, module FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
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
        with self._lock:
            row = self._db.execute(
                "SELECT cancel_requested FROM tasks WHERE id = ? AND state = ?",
                (task_id, State.RUNNING),
            ).fetchone()
            if row is None:
                return None  # a duplicate completion: the first one stands
            if row[0]:
                result = cancelled(result, "cancelled while running" if result.status
                                   is Status.CANCELLED else
                                   f"cancelled while running (it ended {result.status})")
            result, result_json = _storable(result)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE tasks SET state = ?, result_json = ?, cpu_s = ?, finished_at = ?,"
                    " module = NULL WHERE id = ?",
                    (State.FINISHED, result_json, charge, time.time(), task_id),
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO files (task_id, name, data) VALUES (?, ?, ?)",
                    [(task_id, name, data) for name, data in result.files.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(task_id)

    def reject(self, task_id: str, error: str, charge: float = 0.0) -> Record | None:
        """Record that the host refused to run a claimed task; the time it took is charged."""
        if len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + "..."
        error = error.encode("utf-8", "replace").decode("utf-8")
        with self._lock:
            self._db.execute(
                "UPDATE tasks SET state = ?, error = ?, cpu_s = ?, finished_at = ?, module = NULL"
                " WHERE id = ? AND state IN (?, ?)",
                (State.REJECTED, error, charge, time.time(), task_id, State.RUNNING,
                 State.QUEUED),
            )
        return self.get(task_id)

    def cancel(self, task_id: str) -> Record | None:
        """Cancel a queued task now, or flag a running one to be marked cancelled at its end."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, task_json FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                return None
            if row[0] == State.QUEUED:
                task_json = json.loads(row[1])
                result = Result(task_id=task_id, run_id="", tier=task_json["tier"],
                                status=Status.CANCELLED, reason="cancelled before it ran")
                self._db.execute(
                    "UPDATE tasks SET state = ?, cancel_requested = 1, result_json = ?,"
                    " cpu_s = 0, finished_at = ?, module = NULL WHERE id = ?",
                    (State.FINISHED, result.model_dump_json(), time.time(), task_id),
                )
            elif row[0] == State.RUNNING:
                self._db.execute(
                    "UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,)
                )
        return self.get(task_id)

    def get(self, task_id: str) -> Record | None:
        """The task's record, or None if no such task was accepted."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, token, policy, state, cancel_requested, attempts, result_json,"
                " error, submitted_at, started_at, finished_at, cpu_s, reserved_s"
                " FROM tasks WHERE id = ?",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            sizes = dict(self._db.execute(
                "SELECT name, length(data) FROM files WHERE task_id = ?", (task_id,)
            ).fetchall())
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

    def file(self, task_id: str, name: str) -> bytes | None:
        """One output file of a finished task, by its exact name."""
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM files WHERE task_id = ? AND name = ?", (task_id, name)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def in_flight(self, token: str) -> int:
        """How many of the token's tasks are queued or running."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT count(*) FROM tasks WHERE token = ? AND state IN (?, ?)",
                (token, State.QUEUED, State.RUNNING),
            ).fetchone()
        return int(count)

    def charges(self, token: str, since: float) -> list[tuple[float, float]]:
        """(finished_at, charge) of the token's runs that ended after `since`, oldest first
        (purged tasks included)."""
        with self._lock:
            rows = self._db.execute(
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
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        records = [r for r in (self.get(task_id) for _, task_id in rows) if r is not None]
        return records, (int(rows[-1][0]) if more else None)

    def purge(self, finished_before: float, keep_charges_after: float) -> int:
        """Delete final tasks that ended before `finished_before`, and their files; their
        charges that ended after `keep_charges_after` are kept for quota accounting, older
        kept charges are dropped. Returns how many tasks were deleted."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = "state IN (?, ?) AND finished_at < ?"
                params = (State.FINISHED, State.REJECTED, finished_before)
                self._db.execute(
                    "INSERT INTO charges (token, finished_at, charge) SELECT token, finished_at,"
                    f" coalesce(cpu_s, 0) FROM tasks WHERE {old} AND finished_at > ?",
                    (*params, keep_charges_after),
                )
                self._db.execute(
                    f"DELETE FROM files WHERE task_id IN (SELECT id FROM tasks WHERE {old})",
                    params,
                )
                deleted = self._db.execute(f"DELETE FROM tasks WHERE {old}", params).rowcount
                self._db.execute("DELETE FROM charges WHERE finished_at <= ?",
                                 (keep_charges_after,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(deleted)

    def reserved(self, token: str) -> float:
        """Seconds of the token's budget held by its queued and running tasks."""
        with self._lock:
            (held,) = self._db.execute(
                "SELECT coalesce(sum(reserved_s), 0) FROM tasks"
                " WHERE token = ? AND state IN (?, ?)",
                (token, State.QUEUED, State.RUNNING),
            ).fetchone()
        return float(held)

    def recover(self, max_attempts: int) -> list[str]:
        """Queue again every task a crash interrupted; return all queued ids, oldest first.

        A task that was already started `max_attempts` times is rejected instead, so one
        task that kills the service cannot do it forever; it is charged its reservation.
        """
        with self._lock:
            self._db.execute(
                "UPDATE tasks SET state = ?, error = ?, finished_at = ?, module = NULL,"
                " cpu_s = reserved_s WHERE state = ? AND attempts >= ?",
                (State.REJECTED, f"the service stopped during each of {max_attempts} attempts",
                 time.time(), State.RUNNING, max_attempts),
            )
            self._db.execute(
                "UPDATE tasks SET state = ? WHERE state = ?", (State.QUEUED, State.RUNNING)
            )
            rows = self._db.execute(
                "SELECT id FROM tasks WHERE state = ? ORDER BY submitted_at", (State.QUEUED,)
            ).fetchall()
        return [r[0] for r in rows]

    def _release(self) -> None:
        with self._lock:
            self._db.close()


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
