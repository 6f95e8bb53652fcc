"""The host's own helpers: atomic replacement of files and directories, and lazy values."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from wasmbox._fs import atomic_path, write_atomic
from wasmbox._lazy import Lazy


def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("directory", [False, True])
def test_a_failed_atomic_write_keeps_the_old_target_and_removes_its_temporary(
        tmp_path: Path, error: type[BaseException], directory: bool) -> None:
    target = tmp_path / "target"
    if directory:
        target.mkdir()
        (target / "old").write_text("kept")
    else:
        target.write_text("kept")

    def half_write() -> None:
        with atomic_path(target, directory=directory) as tmp:
            if directory:
                (tmp / "nested").mkdir()
                (tmp / "nested" / "half").write_text("half")
            else:
                tmp.write_text("half")
            raise error

    with pytest.raises(error):
        half_write()
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
    assert (target / "old" if directory else target).read_text() == "kept"


def test_an_atomic_directory_appears_whole(tmp_path: Path) -> None:
    target = tmp_path / "tree"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"


def test_a_lazy_value_is_made_once_however_many_threads_ask() -> None:
    calls: list[int] = []

    def make() -> object:
        calls.append(1)
        time.sleep(0.05)  # widens the window in which a second thread could start a copy
        return object()

    lazy = Lazy(make)
    start = threading.Barrier(8)
    seen: list[object] = []

    def ask() -> None:
        start.wait()
        seen.append(lazy.get())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(seen) == 8 and all(value is seen[0] for value in seen)


def test_a_lazy_value_that_failed_is_tried_again() -> None:
    attempts: list[int] = []

    def make() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("first try fails")
        return 7

    lazy = Lazy(make)
    with pytest.raises(OSError, match="first try fails"):
        lazy.get()
    assert lazy.get() == 7 and len(attempts) == 2


def test_taking_a_lazy_value_hands_it_back_once_and_a_new_one_is_made_next() -> None:
    made = iter([1, 2])
    lazy = Lazy(lambda: next(made))
    assert lazy.take() is None  # never made: nothing to clean up
    assert lazy.get() == 1
    assert lazy.take() == 1
    assert lazy.take() is None
    assert lazy.get() == 2
