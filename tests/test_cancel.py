"""Real cancellation: a cancelled run stops its guest promptly, frees everything, and says
CANCELLED. Timing bounds are loose (a loaded 2-core machine): the guests would run 30 s."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmbox import Policy, Resources, Sandbox, Status, Task
from wasmbox.models import TimeoutPolicy

LONG = Resources(timeout=30)
POLICY = Policy(timeouts=TimeoutPolicy(run=60))
PROMPT = 5.0  # seconds; the guest would otherwise run for 30


def _workspaces() -> list[str]:
    return os.listdir(os.environ["WASMBOX_TMPDIR"])


def _cancel_soon(sb: Sandbox, task_id: str, after: float = 0.3) -> threading.Thread:
    def go() -> None:
        end = time.monotonic() + 10
        time.sleep(after)
        while not sb.cancel(task_id) and time.monotonic() < end:
            time.sleep(0.05)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_cancel_stops_a_spinning_wasm_guest(
    make_sandbox: Callable[..., Sandbox], guests: dict[str, Path]
) -> None:
    with make_sandbox(POLICY) as sb:
        task = Task.wasm(guests["infinite_loop"], resources=LONG)
        helper = _cancel_soon(sb, task.id)
        t0 = time.monotonic()
        result = sb.run(task)
        helper.join()
        assert result.status is Status.CANCELLED, result
        assert result.reason == "cancelled by the caller"
        assert time.monotonic() - t0 < PROMPT
        assert not sb.cancel(task.id)  # nothing left running under that id
    assert _workspaces() == []


def test_cancelling_arun_stops_the_guest_and_frees_it(
    make_sandbox: Callable[..., Sandbox], guests: dict[str, Path]
) -> None:
    async def scenario(sb: Sandbox) -> float:
        job = asyncio.ensure_future(sb.arun(Task.wasm(guests["infinite_loop"], resources=LONG)))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        return time.monotonic() - t0

    with make_sandbox(POLICY) as sb:
        assert asyncio.run(scenario(sb)) < PROMPT
        assert _workspaces() == []  # the run finished its cleanup before CancelledError


def test_leaving_imap_early_cancels_what_still_runs(
    make_sandbox: Callable[..., Sandbox], guests: dict[str, Path]
) -> None:
    tasks = [Task.wasm(guests["hello"])] + [
        Task.wasm(guests["infinite_loop"], resources=LONG) for _ in range(3)
    ]
    with make_sandbox(POLICY) as sb:
        t0 = time.monotonic()
        for _index, result in sb.imap(tasks, concurrency=2):
            assert result.ok  # type: ignore[union-attr]
            break
        assert time.monotonic() - t0 < PROMPT
    assert _workspaces() == []


def test_cancel_stops_a_container_task() -> None:
    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("neither crun nor runc is installed")
    with Sandbox(POLICY) as sb:
        task = Task.command(["/bin/sleep", "30"], resources=LONG)
        helper = _cancel_soon(sb, task.id, after=0.5)
        t0 = time.monotonic()
        result = sb.run(task)
        helper.join()
        assert result.status is Status.CANCELLED, result
        assert time.monotonic() - t0 < PROMPT + 5  # container start-up is part of it


def test_cancel_wakes_a_guest_blocked_in_a_host_sleep(
    make_sandbox: Callable[..., Sandbox], guests: dict[str, Path]
) -> None:
    with make_sandbox(POLICY) as sb:
        task = Task.wasm(guests["sleep_long"], args=["rel", "20000"], resources=LONG)
        helper = _cancel_soon(sb, task.id)
        t0 = time.monotonic()
        result = sb.run(task)
        helper.join()
        assert result.status is Status.CANCELLED, result
        assert time.monotonic() - t0 < PROMPT  # not the guest's 20 s sleep
