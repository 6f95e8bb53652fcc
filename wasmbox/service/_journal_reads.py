"""Internal: the task journal's reads, each on the calling thread's own connection."""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict
from pathlib import Path

from wasmbox.models import Result
from wasmbox.service._group_commit import _GroupCommit
from wasmbox.service._journal_schema import UNSTORABLE, Record, State


class _JournalReads(_GroupCommit):
    """Queries of the journal (the writes are `TaskStore`'s); none of them waits for a commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # Only `purge` deletes tasks or modules, so a token that was seen owning a kept module
        # owns it until the next purge: (token, SHA-256) -> `_purges` when it was seen.
        # `_purged()` moves it on before a purge deletes anything and again once it committed.
        self._purge_marks = itertools.count(1)
        self._purges = 0
        self._owners: dict[tuple[str, str], int] = {}

        # Records of tasks this store finished, as `get` reads them, most recent last: a
        # final row changes no more until a purge deletes it, and a purge forgets them all.
        # Filled on the writer thread once durable; at most MAX_FINAL records,
        # MAX_FINAL_CHARS of result JSON in all, none over MAX_FINAL_RESULT_CHARS.
        self._final: OrderedDict[str, tuple[Record, int]] = OrderedDict()
        self._final_chars = 0
        self._final_lock = threading.Lock()

    def _purged(self) -> None:
        """Forget every remembered module owner and final record (a purge is under way or
        just committed)."""
        self._purges = next(self._purge_marks)
        with self._final_lock:
            self._final.clear()
            self._final_chars = 0

    def _keep_final(self, record: Record, chars: int) -> None:
        """Remember the durable final `record` (its result `chars` long as JSON) for `get`."""
        if chars > MAX_FINAL_RESULT_CHARS:
            return  # a big result is read back from the journal when asked for
        with self._final_lock:
            self._final[record.id] = (record, chars)
            self._final_chars += chars
            while len(self._final) > MAX_FINAL or self._final_chars > MAX_FINAL_CHARS:
                self._final_chars -= self._final.popitem(last=False)[1][1]

    def get(self, task_id: str) -> Record | None:
        """The task's record, or None if no such task was accepted."""
        kept = self._final.get(task_id)
        if kept is not None:
            return kept[0]
        # One statement: the row and its files' sizes from one snapshot, no transaction.
        row = self._reader().execute(
            "SELECT id, token, policy, state, cancel_requested, attempts, result_json,"
            " error, submitted_at, started_at, finished_at, cpu_s, reserved_s,"
            " (SELECT json_group_object(name, length(data)) FROM files"
            " WHERE task_id = tasks.id) FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
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
            submitted_at=row[8], started_at=row[9], finished_at=row[10],
            file_sizes=json.loads(row[13]), charged_s=row[11], reserved_s=row[12],
        )

    def module(self, token: str, sha256: str) -> bytes | None:
        """The module of SHA-256 `sha256` if `token` submitted it and it is still kept."""
        kept = "EXISTS (SELECT 1 FROM tasks WHERE module_sha256 = ? AND token = ?)"
        purges = self._purges
        cached = recent_module(sha256)
        if cached is not None:  # the bytes are known: only whether the token may use them
            if self._owners.get((token, sha256)) == purges:
                return cached  # no query: each one on the event loop waits for the GIL
            (found,) = self._reader().execute(
                f"SELECT {kept} AND EXISTS (SELECT 1 FROM modules WHERE sha256 = ?)",
                (sha256, token, sha256),
            ).fetchone()
            data = cached if found else None
        else:
            row = self._reader().execute(
                f"SELECT data FROM modules WHERE sha256 = ? AND {kept}",
                (sha256, sha256, token),
            ).fetchone()
            data = None if row is None else remember_module(sha256, bytes(row[0]))
        if data is not None:
            if len(self._owners) >= MAX_OWNERS:
                self._owners.clear()
            self._owners[(token, sha256)] = purges
        return data

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

    def unfinished(self) -> dict[str, str]:
        """The token of every queued or running task, by task id."""
        rows = self._reader().execute(
            "SELECT id, token FROM tasks WHERE state IN (?, ?)", (State.QUEUED, State.RUNNING)
        ).fetchall()
        return {task_id: token for task_id, token in rows}

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


# The bytes of the modules most recently named by digest or run, so that submitting by
# digest or claiming a task does not read a whole module from the journal each time. Keyed by
# SHA-256 (the journal stores a module under the digest of its bytes), so an entry cannot go
# stale; who may use a module is still asked of the journal every time. At most
# RECENT_MODULES entries, each at most its share of RECENT_MODULE_BYTES.
RECENT_MODULES, RECENT_MODULE_BYTES = 16, 64 * 2**20
# (token, module) pairs whose ownership is remembered between purges, at most.
MAX_OWNERS = 4096
# Final records `get` answers from memory, at most; the result JSON they hold, in all and
# each (a bigger result is read back from the journal when asked for).
MAX_FINAL, MAX_FINAL_CHARS, MAX_FINAL_RESULT_CHARS = 4096, 8 * 2**20, 64 * 2**10
_recent: OrderedDict[str, bytes] = OrderedDict()
_recent_lock = threading.Lock()


def recent_module(sha256: str) -> bytes | None:
    """The bytes of module `sha256` if they are among the recently used ones."""
    with _recent_lock:
        cached = _recent.get(sha256)
        if cached is not None:
            _recent.move_to_end(sha256)
    return cached


def remember_module(sha256: str, data: bytes) -> bytes:
    """Keep `data` (the module whose SHA-256 is `sha256`) among the recent ones if it is
    small enough; returns it."""
    if len(data) <= RECENT_MODULE_BYTES // RECENT_MODULES:
        with _recent_lock:
            _recent[sha256] = data
            while len(_recent) > RECENT_MODULES:
                _recent.popitem(last=False)
    return data
