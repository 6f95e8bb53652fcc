"""Internal: what the task journal stores: its tables, the `Record` of a task, the states.

Opening a journal (`open_journal`) creates the tables and migrates a journal written by an
older version; `_storable` gives a result as it will read back (a stand-in if it cannot).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from wasmbox.models import Result, Status


class State(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


FINAL = frozenset({State.FINISHED, State.REJECTED})

# Reasons stored for rejected tasks are cut here: an exception's text can be huge.
MAX_ERROR_CHARS = 2000
# How long a write or read waits for another process holding the journal's lock.
BUSY_TIMEOUT_S = 5.0
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


def open_journal(path: Path) -> sqlite3.Connection:
    """The journal's write connection: WAL, ``synchronous=FULL``, tables made and migrated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                         timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: an acknowledged task survives power loss too, not only a process crash.
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    if "reserved_s" not in columns:  # a journal written before reservations existed
        db.execute("ALTER TABLE tasks ADD COLUMN reserved_s REAL NOT NULL DEFAULT 0")
    if "module_sha256" not in columns:  # ... or before modules were stored once each
        db.execute("ALTER TABLE tasks ADD COLUMN module_sha256 TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS tasks_by_module ON tasks (module_sha256)"
               " WHERE module_sha256 IS NOT NULL")
    return db


def _storable(result: Result) -> tuple[Result, str, Result]:
    """The result, its JSON and the result `get` reads back from that JSON; a stand-in if it
    cannot be read back."""
    try:
        for name in result.files:
            name.encode("utf-8")
        text = result.model_dump_json(exclude={"files"})
        return result, text, Result.model_validate_json(text)
    except (ValueError, RecursionError):
        pass
    status = Status.CANCELLED if result.status is Status.CANCELLED else Status.OUTPUT_REJECTED
    stand_in = result.model_copy(update={
        "status": status, "reason": UNSTORABLE, "output": None, "files": {}, "stdout": "",
        "stderr": "", "trap": None, "events": (), "escalation_reason": None,
    })
    text = stand_in.model_dump_json(exclude={"files"})
    return stand_in, text, Result.model_validate_json(text)


def cancelled(result: Result, reason: str) -> Result:
    """The result of a cancelled run: its metrics stay (they are charged), its outputs go."""
    return result.model_copy(
        update={"status": Status.CANCELLED, "reason": reason, "output": None, "files": {}}
    )
