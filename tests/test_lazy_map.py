"""`LazyMap` and `Lazy.peek`: the keyed once-init the tiers use for engines, runtimes, pools
and interpreters (`Lazy` itself is covered in test_host_helpers.py)."""

from __future__ import annotations

import threading
import time

import pytest

from wasmbox._lazy import Lazy, LazyMap


def test_each_key_is_made_once_however_many_threads_ask() -> None:
    made: list[int] = []
    start = threading.Barrier(8)
    lazy: LazyMap[int, str] = LazyMap()

    def make(key: int) -> str:
        made.append(key)
        time.sleep(0.001)  # widens the window in which a second thread could make it too
        return f"v{key}"

    def worker() -> None:
        start.wait()
        for key in range(20):
            assert lazy.get(key, lambda k=key: make(k)) == f"v{key}"

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == list(range(20))


def test_a_failed_make_stores_nothing_and_take_all_empties() -> None:
    lazy: LazyMap[str, int] = LazyMap()

    def boom() -> int:
        raise OSError("no")

    with pytest.raises(OSError, match="no"):
        lazy.get("a", boom)
    assert lazy.values() == []
    assert lazy.get("a", lambda: 1) == 1
    assert lazy.get("a", lambda: 2) == 1
    assert lazy.take_all() == [1]
    assert lazy.values() == []
    assert lazy.get("a", lambda: 3) == 3  # made afresh after take_all


def test_peek_never_makes() -> None:
    calls: list[int] = []
    lazy = Lazy(lambda: calls.append(1) or 7)
    assert lazy.peek() is None and calls == []
    assert lazy.get() == 7 and lazy.peek() == 7
    assert lazy.take() == 7 and lazy.peek() is None and calls == [1]
