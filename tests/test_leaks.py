"""Runs leave nothing behind: threads, file descriptors, workspaces, memory."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from wasmbox import Resources, Sandbox, Status, Task
from wasmbox.workspace import PREFIX, workspace_root

MakeSandbox = Callable[..., Sandbox]


@pytest.fixture(autouse=True)
def warm_runtime(make_sandbox: MakeSandbox, guests: dict[str, Path]) -> None:
    # wasmtime creates a process-wide async runtime (an epoll and an eventfd) on first use:
    # once per process, not per run, so it is made before the first snapshot.
    with make_sandbox() as sb:
        sb.run(Task.wasm(guests["hello"]))


def _snapshot() -> tuple[int, int, set[str]]:
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    workspaces = {p.name for p in workspace_root().glob(PREFIX + "*")}
    return threading.active_count(), fds, workspaces


def test_a_thousand_runs_leak_nothing(make_sandbox: MakeSandbox, guests: dict[str, Path]) -> None:
    task = Task.wasm(guests["json_transform"], input={"xs": list(range(50))})
    process = psutil.Process()
    threads0, fds0, ws0 = _snapshot()
    with make_sandbox() as sb:
        for _ in range(200):  # warm-up: engine, caches, allocator arenas
            assert sb.run(task).status is Status.COMPLETED
        rss_warm = process.memory_info().rss
        for _ in range(1000):
            sb.run(task)
        rss_after = process.memory_info().rss
    threads1, fds1, ws1 = _snapshot()
    assert threads1 == threads0, "the epoch ticker or a worker thread outlived the sandbox"
    assert fds1 <= fds0
    assert ws1 <= ws0
    assert rss_after - rss_warm < 16 << 20, f"RSS grew {(rss_after - rss_warm) >> 20} MiB"


def test_timeouts_and_traps_leak_nothing(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    threads0, fds0, ws0 = _snapshot()
    with make_sandbox() as sb:
        for _ in range(10):
            r = sb.run(Task.wasm(guests["infinite_loop"], resources=Resources(timeout="20ms")))
            assert r.status is Status.TIMEOUT
            assert sb.run(Task.wasm(guests["trap_unreachable"])).status is Status.CRASHED
            flood = sb.run(Task.wasm(guests["output_size_flood"]))
            assert flood.status is Status.OUTPUT_REJECTED
    threads1, fds1, ws1 = _snapshot()
    assert (threads1, ws1) == (threads0, ws0)
    assert fds1 <= fds0


def test_an_exception_inside_a_run_still_removes_the_workspace(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    # A KeyboardInterrupt raised while the guest runs must not leave the run's directory.
    from wasmbox.tiers.wasm import tier as wasm_tier

    real = wasm_tier._execute
    _, _, ws0 = _snapshot()

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    with make_sandbox() as sb:
        sb.run(Task.wasm(guests["hello"]))
        wasm_tier._execute = interrupted  # type: ignore[assignment]
        try:
            try:
                sb.run(Task.wasm(guests["hello"]))
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the interrupt was swallowed")
        finally:
            wasm_tier._execute = real
    assert _snapshot()[2] <= ws0
