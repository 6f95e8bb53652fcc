"""The durable task journal (SQLite, WAL): a task is committed here before it is acknowledged.

States: ``queued`` -> ``running`` -> ``finished`` (a `Result`, possibly CANCELLED) or
``rejected`` (the host refused to run it: a policy violation, a bad module). A task found
``running`` at start-up was interrupted by a crash and is queued again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from wasmbox.lifecycle import Closeable
from wasmbox.models import Result, Status, Task


class State(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


FINAL = frozenset({State.FINISHED, State.REJECTED})

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
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_by_token_state ON tasks (token, state);
CREATE INDEX IF NOT EXISTS tasks_by_token_finish ON tasks (token, finished_at);
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

    def add(self, token: str, policy: str, task: Task) -> None:
        """Journal a new queued task; returns once it is durable."""
        task_json = task.model_dump_json(exclude={"module_bytes"})
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (id, token, policy, state, task_json, module, submitted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (task.id, token, policy, State.QUEUED, task_json, task.module_bytes, time.time()),
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

    def finish(self, task_id: str, result: Result) -> Record | None:
        """Record the result of a running task; a pending cancel turns it into CANCELLED."""
        with self._lock:
            row = self._db.execute(
                "SELECT cancel_requested FROM tasks WHERE id = ? AND state = ?",
                (task_id, State.RUNNING),
            ).fetchone()
            if row is None:
                return None  # a duplicate completion: the first one stands
            if row[0]:
                result = cancelled(result, f"cancelled while running (it ended {result.status})")
            charge = result.metrics.cpu_s if result.metrics.cpu_s is not None \
                else result.metrics.wall_s
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE tasks SET state = ?, result_json = ?, cpu_s = ?, finished_at = ?,"
                    " module = NULL WHERE id = ?",
                    (State.FINISHED, result.model_dump_json(exclude={"files"}), charge,
                     time.time(), task_id),
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

    def reject(self, task_id: str, error: str) -> Record | None:
        """Record that the host refused to run a claimed task."""
        with self._lock:
            self._db.execute(
                "UPDATE tasks SET state = ?, error = ?, finished_at = ?, module = NULL"
                " WHERE id = ? AND state IN (?, ?)",
                (State.REJECTED, error, time.time(), task_id, State.RUNNING, State.QUEUED),
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
                " error, submitted_at, started_at, finished_at FROM tasks WHERE id = ?",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            sizes = dict(self._db.execute(
                "SELECT name, length(data) FROM files WHERE task_id = ?", (task_id,)
            ).fetchall())
        result = Result.model_validate_json(row[6]) if row[6] is not None else None
        return Record(
            id=row[0], token=row[1], policy=row[2], state=State(row[3]),
            cancel_requested=bool(row[4]), attempts=row[5], result=result, error=row[7],
            submitted_at=row[8], started_at=row[9], finished_at=row[10], file_sizes=sizes,
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

    def cpu_used(self, token: str, since: float) -> float:
        """CPU (or wall) seconds charged to the token by tasks finished after `since`."""
        with self._lock:
            (used,) = self._db.execute(
                "SELECT coalesce(sum(cpu_s), 0) FROM tasks WHERE token = ? AND finished_at > ?",
                (token, since),
            ).fetchone()
        return float(used)

    def recover(self, max_attempts: int) -> list[str]:
        """Queue again every task a crash interrupted; return all queued ids, oldest first.

        A task that was already started `max_attempts` times is rejected instead, so one
        task that kills the service cannot do it forever.
        """
        with self._lock:
            self._db.execute(
                "UPDATE tasks SET state = ?, error = ?, finished_at = ?, module = NULL"
                " WHERE state = ? AND attempts >= ?",
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


def cancelled(result: Result, reason: str) -> Result:
    """The result of a cancelled run: its metrics stay (they are charged), its outputs go."""
    return result.model_copy(
        update={"status": Status.CANCELLED, "reason": reason, "output": None, "files": {}}
    )
