"""Many tasks on one sandbox: `map`, `imap`, `arun`, and cancelling by task id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Literal, overload

from wasmbox.errors import SandboxError
from wasmbox.lifecycle import Closeable, Deadline
from wasmbox.models import Result, Task

if TYPE_CHECKING:
    from wasmbox.procpool import ProcessPool


class Batching(Closeable):
    """The batch and cancel half of `Sandbox` (which provides `run`, `_run_registered`,
    `_process_pool`); every run is registered under its task id while it runs."""

    _lock: threading.Lock
    _cancels: dict[str, set[Cancel]]

    def run(self, task: Task) -> Result:
        """Run one task (see `Sandbox.run`)."""
        raise NotImplementedError

    def _run_registered(self, task: Task, token: Cancel) -> Result:
        raise NotImplementedError

    def _process_pool(self, processes: int) -> ProcessPool:
        raise NotImplementedError

    def cancel(self, task_id: str) -> bool:
        """Stop every running (or about to run) task with this id: its guest is stopped as on
        a timeout, everything is freed, and its result says `Status.CANCELLED`. True when a
        run was found. Thread-safe; `arun` calls it when its asyncio task is cancelled."""
        with self._lock:
            tokens = list(self._cancels.get(task_id, ()))
        for token in tokens:
            token.cancel()
        return bool(tokens)

    def _run(self, task: Task, token: Cancel) -> Result:
        self._ensure_open()
        with self._lock:
            self._cancels.setdefault(task.id, set()).add(token)
        try:
            return self._run_registered(task, token)
        finally:
            with self._lock:
                tokens = self._cancels.get(task.id)
                if tokens is not None:
                    tokens.discard(token)
                    if not tokens:
                        del self._cancels[task.id]

    @overload
    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: Literal[False] = False,
            processes: int | None = None) -> list[Result]: ...

    @overload
    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: Literal[True],
            processes: int | None = None) -> list[Result | SandboxError]: ...

    def map(self, tasks: Iterable[Task], concurrency: int = 1, *,
            return_exceptions: bool = False,
            processes: int | None = None) -> list[Result] | list[Result | SandboxError]:
        """Run many tasks on `concurrency` threads; results keep the order of `tasks`.

        A task the host refuses (`PolicyViolation`, `InputRejected`, ...) raises, as `run`
        does, after every other task has finished; with ``return_exceptions=True`` its error
        takes its place in the list instead, and no result is lost.

        ``processes=N`` runs the batch on N spawned worker processes instead (each with its
        own warm sandbox and this policy), which scales short tasks past the GIL; the pool
        is kept for later calls and closed with the sandbox. Tier factories must pickle.
        """
        if processes is not None and processes > 0:
            pool = self._process_pool(processes)
            if return_exceptions:
                return pool.map(tasks, return_exceptions=True)
            return pool.map(tasks)
        out = [item for _, item in self.imap(tasks, concurrency, return_exceptions=True)]
        if not return_exceptions:
            for item in out:
                if isinstance(item, SandboxError):
                    raise item
            return [item for item in out if isinstance(item, Result)]
        return out

    def imap(self, tasks: Iterable[Task], concurrency: int = 1, *, ordered: bool = True,
             return_exceptions: bool = False) -> Iterator[tuple[int, Result | SandboxError]]:
        """Yield ``(index, result)`` as tasks finish, for batches too large to hold.

        At most ``2 * concurrency`` tasks are taken from `tasks` ahead of the results, so
        an endless generator works. ``ordered=True`` yields in input order; ``False`` as
        each completes. A refused task raises where it is yielded, or is yielded as its
        `SandboxError` with ``return_exceptions=True``.
        """
        self._ensure_open()
        workers = max(1, concurrency)
        source = enumerate(tasks)
        if workers == 1:  # in the caller's thread, one at a time
            for index, task in source:
                try:
                    yield index, self.run(task)
                except SandboxError as exc:
                    if not return_exceptions:
                        raise
                    yield index, exc
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="wasmbox-run") as pool:
            pending: dict[Future[Result], int] = {}
            switches: dict[Future[Result], Cancel] = {}
            done_early: dict[int, Future[Result]] = {}
            next_index = 0

            def fill() -> None:
                room = 2 * workers - len(pending) - len(done_early)
                for index, task in itertools.islice(source, max(0, room)):
                    token = Cancel()
                    future = pool.submit(self._run, task, token)
                    pending[future], switches[future] = index, token

            def unwrap(index: int, future: Future[Result]) -> tuple[int, Result | SandboxError]:
                exc = future.exception()
                if exc is None:
                    return index, future.result()
                if return_exceptions and isinstance(exc, SandboxError):
                    return index, exc
                raise exc

            try:
                fill()
                while pending or done_early:
                    if ordered and next_index in done_early:
                        yield unwrap(next_index, done_early.pop(next_index))
                        next_index += 1
                        fill()  # the yielded slot is free: without this, a batch whose
                        continue  # window drained out of order ended early
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        index = pending.pop(future)
                        switches.pop(future, None)
                        if ordered:
                            done_early[index] = future
                        else:
                            yield unwrap(index, future)
                    fill()
            finally:  # the consumer stopped early (break, error, Ctrl-C): stop the rest
                for future in pending:
                    future.cancel()
                    switches[future].cancel()

    async def arun(self, task: Task) -> Result:
        """`run` for asyncio: the task runs on a worker thread.

        Cancelling the awaiting asyncio task stops the guest (as `cancel` does), waits until
        its resources are freed, and re-raises `CancelledError`.
        """
        token = Cancel()
        running = asyncio.ensure_future(asyncio.to_thread(self._run, task, token))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            token.cancel()
            with contextlib.suppress(Exception):
                await running  # the guest stops within a watchdog tick; cleanup completes
            raise


class Cancel:
    """One run's cancel switch; it may be thrown before the run's deadline exists."""

    __slots__ = ("_deadline", "_lock", "_thrown")

    def __init__(self) -> None:
        self._deadline: Deadline | None = None
        self._thrown = False
        self._lock = threading.Lock()

    def attach(self, deadline: Deadline) -> Deadline:
        with self._lock:
            self._deadline = deadline
            if self._thrown:
                deadline.cancel()
        return deadline

    def cancel(self) -> None:
        with self._lock:
            self._thrown = True
            if self._deadline is not None:
                self._deadline.cancel()
