"""The generic pool: one use per item, background refill, shapes, cleanup."""

from __future__ import annotations

import itertools
import threading

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
