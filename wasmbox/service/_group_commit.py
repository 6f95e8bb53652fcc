"""Internal: the task journal's group commit: one writer thread, one fsync per batch.

Every thread's write joins the next transaction of the writer thread, which commits and only
then returns to each caller, so "returned" still means "durable" and concurrent writers share
the fsync. Reads use a connection per thread (WAL: readers never wait for the writer).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from wasmbox.lifecycle import Closeable
from wasmbox.service._journal_schema import BUSY_TIMEOUT_S, open_journal

# Writes committed in one transaction at most (one fsync for all of them).
MAX_BATCH = 256
T = TypeVar("T")
log = logging.getLogger("wasmbox.service")


class _GroupCommit(Closeable):
    """The journal's connections: one writer thread committing batches, a reader per thread.

    One failing write is rolled back alone (the batch is run again with a savepoint per
    write); a failing commit fails the whole batch, none of it stored. A batch that mixes
    durable writes with others commits the others first, on their own (two transactions).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        # One connection, its synchronous mode switched for writes that need no fsync: a
        # second connection that never syncs saved the PRAGMAs but cost more than they do
        # (each connection's page cache is dropped whenever the other one has written).
        self._db = open_journal(path)
        self._synced = True
        self._local = threading.local()
        self._readers: dict[threading.Thread, sqlite3.Connection] = {}
        self._gate = threading.Lock()  # orders queueing a write against closing
        self._closed = False
        self._writes: queue.SimpleQueue[_Write[Any] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="wasmbox-journal",
                                        daemon=True)
        self._writer.start()

    def _write(
        self, op: Callable[[sqlite3.Connection], T], durable: bool = True, solo: bool = False,
    ) -> T:
        """Run `op` in the next committed batch; return its value once the batch is durable.

        `durable=False`: committed without the fsync when no other write of its batch needs
        one (it survives the process being killed, not the machine losing power).
        `solo`: see `_queue_write`.
        """
        return self._queue_write(op, durable=durable, solo=solo).result()

    def _queue_write(
        self, op: Callable[[sqlite3.Connection], T],
        after: Callable[[bool], None] | None = None, durable: bool = True, solo: bool = False,
    ) -> Future[T]:
        """Queue `op` for the next batch; the future resolves once the batch is durable.

        `after(committed)` runs on the writer thread once the batch's fate is known, before
        the future resolves (True: `op` succeeded and its batch committed). `op` may run
        twice (undone in between, when another write of its batch failed): it must change
        nothing but the journal. `solo`: `op` changes the journal with one statement at
        most (it may read after it), so when it is alone in its transaction, or among other
        solo writes that need no fsync, it runs without BEGIN and COMMIT (two statements,
        two GIL round trips): its statement commits itself.
        """
        future: Future[T] = Future()
        # Running from the start: cancelling it (a client that went away while its
        # submission was awaited) cannot stop the write or fail the writer's set_result.
        future.set_running_or_notify_cancel()
        with self._gate:
            if self._closed:
                raise sqlite3.ProgrammingError("the task journal is closed")
            self._writes.put(_Write(op, future, after, durable, solo))
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
        durable = [write for write in batch if write.durable]
        if durable and len(durable) < len(batch):
            # The writes that need no fsync (claims) commit first, in their own transaction,
            # and are answered before the others' fsync: a worker waiting for its claim does
            # not wait for the submissions' and results' fsync too (a few ms on this disk).
            # The durable commit that follows syncs them as well.
            self._commit_part([write for write in batch if not write.durable], synced=False)
            self._commit_part(durable, synced=True)
        else:
            self._commit_part(batch, synced=bool(durable))

    def _commit_part(self, batch: list[_Write[Any]], synced: bool) -> None:
        db = self._db
        try:
            if synced != self._synced:  # WAL: FULL fsyncs at each commit, NORMAL does not
                db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
                self._synced = synced
            # Savepoints cost two statements a write (each a round trip through the contended
            # GIL) and are almost never needed: the batch runs without them, and only if one
            # of its writes fails is it undone whole and run again with a savepoint each, so
            # that the failing write alone is undone. A write alone in its batch needs none.
            if all(write.solo for write in batch) and (len(batch) == 1 or not synced):
                # Each commits itself; with no fsync to share, separate commits cost less
                # than BEGIN and COMMIT around them (claims need not be atomic together).
                outcomes = [_alone(db, write) for write in batch]
            else:
                outcomes = (self._apply(db, batch, savepoints=False)
                            or self._apply(db, batch, savepoints=True))
            if db.in_transaction:
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
        for write, (ok, value) in zip(batch, outcomes, strict=True):
            _after(write, ok)
            if ok:
                write.future.set_result(value)
            else:
                write.future.set_exception(value)

    def _apply(
        self, db: sqlite3.Connection, batch: list[_Write[Any]], savepoints: bool,
    ) -> list[tuple[bool, Any]]:
        """Run the batch's writes in one open transaction: (succeeded, value or exception)
        each. Without `savepoints`, a failing write undoes the transaction and, unless it was
        alone, the answer is empty (run the batch again with them)."""
        db.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        for write in batch:
            if savepoints:
                db.execute("SAVEPOINT one")
            try:
                value = write.op(db)
            except Exception as exc:  # this write alone is undone
                if savepoints:
                    db.execute("ROLLBACK TO one")
                else:
                    db.execute("ROLLBACK")
                    if len(batch) > 1:
                        return []
                outcomes.append((False, exc))
            else:
                outcomes.append((True, value))
            if savepoints:
                db.execute("RELEASE one")
        return outcomes

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
    solo: bool = False


def _alone(db: sqlite3.Connection, write: _Write[Any]) -> tuple[bool, Any]:
    """Run a `solo` write outside a transaction: (succeeded, value or exception)."""
    try:
        return True, write.op(db)
    except Exception as exc:  # its one statement changed nothing, or it stands committed
        return False, exc


def _after(write: _Write[Any], committed: bool) -> None:
    if write.after is not None:
        try:
            write.after(committed)
        except Exception:  # the writer outlives any follow-up's failure
            log.exception("a journal write's follow-up failed")
