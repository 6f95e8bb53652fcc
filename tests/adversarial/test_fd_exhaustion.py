"""Class 8: a guest must not use up the host process's file descriptors.

Threat: every file a wasm guest opens is a file descriptor of the host process. A guest
opening files forever exhausted them: other threads of the host (other runs, the service)
got EMFILE, and `run` itself raised OSError reading the guest's stdout. ``path_open`` is now
shadowed to refuse with EMFILE past `MAX_OPEN_FILES` per run (the guest sees an ordinary
errno), ``fd_close``/``fd_renumber`` give budget back, and the store (with every fd the
guest still holds) is closed before the host reads the streams.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from wasmbox import Resources, Sandbox, Status, Task
from wasmbox.tiers.wasm.hostcalls import MAX_OPEN_FILES

pytestmark = pytest.mark.timeout(120, method="thread")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _HostOpener(threading.Thread):
    """Another host thread that keeps opening (and closing) a file while a run goes on."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.errors: list[OSError] = []
        self.opens = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fd = os.open(os.devnull, os.O_RDONLY)
            except OSError as exc:
                self.errors.append(exc)
            else:
                os.close(fd)
                self.opens += 1


@pytest.fixture
def warm(sandbox: Sandbox, guests: dict[str, Path]) -> Sandbox:
    # One run first, so the engine's own lasting fds are open before counting.
    sandbox.run(Task.wasm(guests["fd_bomb"], args=["cycle"]))
    return sandbox


def test_fd_bomb_gets_emfile_from_its_own_cap_and_the_host_is_untouched(
    warm: Sandbox, guests: dict[str, Path]
) -> None:
    before = _open_fds()
    other = _HostOpener()
    other.start()
    try:
        r = warm.run(Task.wasm(guests["fd_bomb"], resources=Resources(timeout=20)))
    finally:
        other.stop.set()
        other.join()
    assert (r.status, r.exit_code) == (Status.FAILED, 3), (r.reason, r.stdout)
    assert r.stdout.strip() == f"opened={MAX_OPEN_FILES} errno=33 emfile=1"
    assert other.errors == [] and other.opens > 0
    assert _open_fds() == before  # every fd the guest held is closed with its store


def test_fd_bomb_that_never_stops_is_a_timeout_not_an_exception(
    warm: Sandbox, guests: dict[str, Path]
) -> None:
    before = _open_fds()
    r = warm.run(Task.wasm(guests["fd_bomb"], args=["forever"],
                           resources=Resources(timeout="500ms")))
    assert r.status is Status.TIMEOUT
    assert _open_fds() == before


def test_closing_gives_budget_back(warm: Sandbox, guests: dict[str, Path]) -> None:
    r = warm.run(Task.wasm(guests["fd_bomb"], args=["cycle"]))
    assert (r.status, r.stdout.strip()) == (Status.COMPLETED, "cycled 2000")


def test_each_run_has_its_own_budget(warm: Sandbox, guests: dict[str, Path]) -> None:
    tasks = [Task.wasm(guests["fd_bomb"], resources=Resources(timeout=20)) for _ in range(3)]
    for r in warm.map(tasks, concurrency=3):
        assert r.stdout.strip() == f"opened={MAX_OPEN_FILES} errno=33 emfile=1"
