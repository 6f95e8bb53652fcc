"""The generic pool: one use per item, background refill, shapes, cleanup."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from prometheus_client import REGISTRY

from wasmbox.pool import Pool


class Ledger:
    """Real objects with a lifecycle we can audit: which were made, which destroyed."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.made: list[tuple[str, int]] = []
        self.destroyed: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def create(self, shape: str) -> tuple[str, int]:
        item = (shape, next(self.counter))
        with self.lock:
            self.made.append(item)
        return item

    def destroy(self, item: tuple[str, int]) -> None:
        with self.lock:
            self.destroyed.append(item)


def test_a_pool_never_hands_out_the_same_item_twice() -> None:
    ledger = Ledger()
    with Pool[str, tuple[str, int]]("test", 2, ledger.create, ledger.destroy) as pool:
        pool.warm("a")
        taken = []
        for _ in range(20):
            assert pool.wait_filled(5)
            item = pool.take("a")
            assert item is not None
            taken.append(item)
    assert len(set(taken)) == len(taken) == 20


def test_a_miss_returns_none_instead_of_blocking() -> None:
    gate = threading.Event()
    ledger = Ledger()

    def slow(shape: str) -> tuple[str, int]:
        gate.wait(5)
        return ledger.create(shape)

    with Pool[str, tuple[str, int]]("test", 1, slow, ledger.destroy) as pool:
        assert pool.take("a") is None
        gate.set()


def test_items_of_an_old_shape_are_destroyed_not_served() -> None:
    ledger = Ledger()
    with Pool[str, tuple[str, int]]("test", 2, ledger.create, ledger.destroy) as pool:
        pool.warm("a")
        assert pool.wait_filled(5)
        pool.warm("b")
        assert pool.wait_filled(5)
        item = pool.take("b")
        assert item is not None and item[0] == "b"
    assert {s for s, _ in ledger.destroyed} >= {"a"}


def test_unusable_items_are_skipped_and_destroyed() -> None:
    ledger = Ledger()
    with Pool[str, tuple[str, int]]("test", 2, ledger.create, ledger.destroy,
                                    usable=lambda item: item[1] >= 2) as pool:
        pool.warm("a")
        assert pool.wait_filled(5)  # items 0 and 1: both unusable
        assert pool.take("a") is None
        assert {("a", 0), ("a", 1)} <= set(ledger.destroyed)
        assert pool.wait_filled(5)
        item = pool.take("a")
    assert item is not None and item[1] >= 2


def test_close_destroys_every_idle_item_and_stops_the_thread() -> None:
    ledger = Ledger()
    before = threading.active_count()
    pool = Pool[str, tuple[str, int]]("test", 3, ledger.create, ledger.destroy)
    pool.warm("a")
    assert pool.wait_filled(5)
    taken = pool.take("a")
    pool.close()
    assert threading.active_count() == before
    assert set(ledger.made) - {taken} == set(ledger.destroyed)


def _gated(ledger: Ledger, gate: threading.Semaphore) -> Callable[[str], tuple[str, int]]:
    def create(shape: str) -> tuple[str, int]:
        gate.acquire()
        return ledger.create(shape)

    return create


def test_each_miss_grows_the_pool_up_to_grow_to() -> None:
    ledger, gate = Ledger(), threading.Semaphore(0)
    with Pool[str, tuple[str, int]]("test", 1, _gated(ledger, gate), ledger.destroy,
                                    grow_to=3) as pool:
        for _ in range(4):  # nothing can be made yet: every take misses
            assert pool.take("a") is None
        gate.release(10)
        assert pool.wait_filled(5)
        assert (pool.size, pool.idle) == (3, 3)


def test_without_grow_to_misses_do_not_grow_the_pool() -> None:
    ledger, gate = Ledger(), threading.Semaphore(0)
    with Pool[str, tuple[str, int]]("test", 1, _gated(ledger, gate), ledger.destroy) as pool:
        for _ in range(3):
            assert pool.take("a") is None
        gate.release(10)
        assert pool.wait_filled(5)
        assert (pool.size, pool.idle) == (1, 1)


def test_hits_and_misses_are_counted_per_tier() -> None:
    def count(result: str) -> float:
        value = REGISTRY.get_sample_value("wasmbox_pool_requests_total",
                                          {"tier": "counted", "result": result})
        return value or 0.0

    ledger, gate = Ledger(), threading.Semaphore(0)
    hits, misses = count("hit"), count("miss")
    with Pool[str, tuple[str, int]]("counted", 1, _gated(ledger, gate), ledger.destroy) as pool:
        assert pool.take("a") is None
        gate.release(10)
        assert pool.wait_filled(5)
        assert pool.take("a") is not None
    assert (count("hit") - hits, count("miss") - misses) == (1.0, 1.0)
