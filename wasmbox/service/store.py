"""Internal: the durable task journal (SQLite, WAL): a task is committed here before it is
acknowledged.

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
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeAlias, TypeVar

from wasmbox.errors import InputRejected
from wasmbox.models import Result, Status, Task

# `X as X`: re-exported, defined here before the journal was split into internal modules.
from wasmbox.service._group_commit import MAX_BATCH as MAX_BATCH
from wasmbox.service._journal_reads import _JournalReads, recent_module, remember_module
from wasmbox.service._journal_schema import BUSY_TIMEOUT_S as BUSY_TIMEOUT_S
from wasmbox.service._journal_schema import FINAL as FINAL
from wasmbox.service._journal_schema import MAX_ERROR_CHARS, _storable
from wasmbox.service._journal_schema import UNSTORABLE as UNSTORABLE
from wasmbox.service._journal_schema import Record as Record
from wasmbox.service._journal_schema import State as State
from wasmbox.service._journal_schema import cancelled as cancelled

T = TypeVar("T")
# A module upserted this recently (seconds) is not upserted again by the next task naming it
# (see `TaskStore.__init__`); at most MAX_TOUCHED modules are remembered so.
MODULE_TOUCH_S = 5.0
MAX_TOUCHED = 1024
# What `TaskStore.finish` stored: the final result and when the task was submitted; None
# for a duplicate completion.
Ended: TypeAlias = tuple[Result, float] | None
# Called on the journal's writer thread with a write's future once its fate is known.
Done: TypeAlias = Callable[[Future[T]], None]


class TaskStore(_JournalReads):
    """Thread-safe journal of tasks and their results in one SQLite file.

    Writes are group-committed: every thread's write joins the next transaction of one
    writer thread, which commits (one fsync, ``synchronous=FULL``) and only then returns to
    each caller, so "returned" still means "durable" and concurrent writers share the fsync.
    One failing write is rolled back alone (a savepoint); a failing commit fails the whole
    batch, none of it stored. Reads use a connection per thread (WAL: readers never wait for
    the writer).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # Writer thread only. Modules upserted by a committed `add`, by SHA-256: when it set
        # their ``last_used``. A task naming one of them within MODULE_TOUCH_S of that is
        # inserted without upserting it again (a statement, and its blob bound, each time):
        # the row exists until a purge, which forgets them all, and no purge deletes it while
        # the task is queued or running. `_unsaved`: the latest submission time not written
        # to ``last_used`` since; a purge writes them first, so it deletes no module early.
        self._touched: dict[str, float] = {}
        self._unsaved: dict[str, float] = {}

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

        upserted = [False]

        def insert(db: sqlite3.Connection) -> Record:
            upserted[0] = False  # (this write may run twice: see `_queue_write`)
            if digest is not None:  # stored once however many tasks run it
                fresh = now - self._touched.get(digest, -math.inf) <= MODULE_TOUCH_S
                if not fresh or (digest not in self._unsaved
                                 and len(self._unsaved) >= MAX_TOUCHED):
                    db.execute(
                        "INSERT INTO modules (sha256, data, last_used) VALUES (?, ?, ?)"
                        " ON CONFLICT (sha256) DO UPDATE SET last_used = excluded.last_used",
                        (digest, module, now),
                    )
                    upserted[0] = True
                elif now > self._unsaved.get(digest, -math.inf):
                    self._unsaved[digest] = now
            db.execute(
                "INSERT INTO tasks (id, token, policy, state, task_json, module_sha256,"
                " reserved_s, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task.id, token, policy, State.QUEUED, task_json, digest, reserved_s, now),
            )
            return record

        def journaled(committed: bool) -> None:  # on the writer thread, before any caller
            if committed and upserted[0] and digest is not None:
                self._touched[digest] = max(now, self._touched.pop(digest, now))
                if self._unsaved.get(digest, -math.inf) <= now:
                    self._unsaved.pop(digest, None)
                if len(self._touched) > MAX_TOUCHED:
                    self._touched.pop(next(iter(self._touched)))
            if after is not None:
                after(committed)

        return self._queue_write(insert, journaled)

    def claim(self, task_id: str) -> tuple[str, Task] | None:
        """Mark a queued task running and return (policy name, task); None if not queued."""

        def claim(db: sqlite3.Connection) -> tuple[str, str, bytes | None, str | None] | None:
            # fetchall: a RETURNING statement is stepped to its end, never left open.
            rows: list[tuple[str, str, bytes | None, str | None]] = db.execute(
                "UPDATE tasks SET state = ?, started_at = ?, attempts = attempts + 1"
                " WHERE id = ? AND state = ? RETURNING policy, task_json, module, module_sha256",
                (State.RUNNING, time.time(), task_id, State.QUEUED),
            ).fetchall()
            row = rows[0] if rows else None
            if row is None or row[2] is not None or row[3] is None:
                return row  # not queued, no module, or one stored in its row (older journals)
            # A recently used module's bytes are taken from memory, not copied out again.
            data = recent_module(row[3])
            if data is None:
                kept = db.execute("SELECT data FROM modules WHERE sha256 = ?",
                                  (row[3],)).fetchone()
                data = None if kept is None else kept[0]
            return (*row[:2], data, row[3])

        # Not fsynced on its own: a claim lost with the machine's power only undercounts the
        # task's attempts by one; the next durable commit (its finish, say) covers it too.
        # It is committed (in the WAL: it survives the process) before its run starts, so a
        # task that kills the service is counted. One statement: `solo`.
        found = self._write(claim, durable=False, solo=True)
        if found is None:
            return None
        policy, task_json, module, digest = found
        data = json.loads(task_json)
        if module is not None:
            module = bytes(module)
            data["module_bytes"] = module if digest is None else remember_module(digest, module)
        return policy, Task.model_validate(data)

    def finish(
        self, task_id: str, result: Result, charge: float, done: Done[Ended] | None = None,
    ) -> Record | None:
        """Record the result of a running task and its charge (seconds against its budget).

        A pending cancel turns it into CANCELLED. A result that could not be read back (JSON
        nested past the parser's limit, a lone surrogate in a string or a file name) is stored
        as OUTPUT_REJECTED without the guest's data, so one hostile result breaks no reader.

        With `done`, returns None at once: `done(future)` runs on the journal's writer thread
        once the write is durable (or failed); the future gives the stored result and when the
        task was submitted, or None for a duplicate completion (the first one stands).
        """
        stored = _storable(result)  # serialised here, not on the writer thread
        # The final record as `get` would read it: kept in memory once it is durable, so the
        # long-polls it wakes (and polls soon after) do not read it back from the journal.
        kept: list[tuple[Record, int] | None] = [None]

        def finish(db: sqlite3.Connection) -> Ended:
            final, result_json, read_back = stored
            finished_at = time.time()
            rows = db.execute(
                "UPDATE tasks SET state = ?, result_json = ?, cpu_s = ?, finished_at = ?,"
                " module = NULL WHERE id = ? AND state = ? RETURNING cancel_requested,"
                " submitted_at, token, policy, attempts, started_at, reserved_s, error",
                (State.FINISHED, result_json, charge, finished_at, task_id, State.RUNNING),
            ).fetchall()
            kept[0] = None  # (this write may run twice: see `_queue_write`)
            if not rows:
                return None  # a duplicate completion: the first one stands
            row = rows[0]
            if row[0]:  # cancelled while it ran: that result replaces this one
                final, result_json, read_back = _storable(cancelled(
                    result, "cancelled while running" if result.status is Status.CANCELLED
                    else f"cancelled while running (it ended {result.status})"))
                db.execute("UPDATE tasks SET result_json = ? WHERE id = ?",
                           (result_json, task_id))
            if final.files:
                db.executemany(
                    "INSERT OR REPLACE INTO files (task_id, name, data) VALUES (?, ?, ?)",
                    [(task_id, name, data) for name, data in final.files.items()],
                )
            kept[0] = (Record(
                id=task_id, token=row[2], policy=row[3], state=State.FINISHED,
                cancel_requested=bool(row[0]), attempts=row[4], result=read_back,
                error=row[7], submitted_at=row[1], started_at=row[5], finished_at=finished_at,
                file_sizes={name: len(data) for name, data in final.files.items()},
                charged_s=charge, reserved_s=row[6],
            ), len(result_json))
            return final, float(row[1])

        def durable(committed: bool) -> None:  # on the writer thread, before any caller hears
            if committed and kept[0] is not None:
                self._keep_final(*kept[0])

        if done is not None:
            self._queue_write(finish, durable).add_done_callback(done)
            return None
        if self._queue_write(finish, durable).result() is None:
            return None
        return self.get(task_id)

    def reject(
        self, task_id: str, error: str, charge: float = 0.0, done: Done[None] | None = None,
    ) -> Record | None:
        """Record that the host refused to run a claimed task; the time it took is charged.

        With `done`, returns None at once and calls it as `finish` does."""
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

        if done is not None:
            self._queue_write(reject).add_done_callback(done)
            return None
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
            self._purged()  # before anything is deleted, and again below once committed
            if self._unsaved:  # submissions that did not upsert their module: now they do
                db.executemany(
                    "UPDATE modules SET last_used = max(last_used, ?) WHERE sha256 = ?",
                    [(at, digest) for digest, at in self._unsaved.items()],
                )
            # Modules may be deleted below: the next submission of each one upserts it.
            self._touched.clear()
            self._unsaved.clear()
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

        try:
            return self._write(purge)
        finally:
            self._purged()

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
