"""Internal: a value made on first use, exactly once, safely across threads.

It replaces the hand-rolled ``if self._x is None: with lock: if self._x is None: ...``
pattern: `Lazy.get` makes the value once (other threads wait for it rather than make their
own), and `Lazy.take` hands it back for cleanup, so the next `get` makes a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """Holds what `make` returns, made by the first `get`; thread-safe.

    If `make` raises, nothing is held and the next `get` tries again.
    """

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._box: tuple[T] | None = None  # a box, so that a made None is told from unmade
        self._lock = threading.Lock()

    def get(self) -> T:
        """The value, made now if this is the first call (or the first since `take`)."""
        box = self._box  # the fast path: no lock once the value exists
        if box is None:
            with self._lock:
                box = self._box
                if box is None:
                    box = self._box = (self._make(),)
        return box[0]

    def peek(self) -> T | None:
        """The value if it was made (None otherwise), without making it."""
        box = self._box
        return None if box is None else box[0]

    def take(self) -> T | None:
        """The value if it was made (None otherwise), which this no longer holds."""
        with self._lock:
            box, self._box = self._box, None
        return None if box is None else box[0]


K = TypeVar("K")


class LazyMap(Generic[K, T]):
    """One value per key, made by the first `get` of that key, exactly once; thread-safe.

    Makes run one at a time (under one lock); a `make` that raises stores nothing.
    """

    def __init__(self) -> None:
        self._items: dict[K, T] = {}
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], T]) -> T:
        """The value of `key`, made now by `make` if there is none yet."""
        try:
            return self._items[key]  # the fast path: no lock once the value exists
        except KeyError:
            pass
        with self._lock:
            try:
                return self._items[key]
            except KeyError:
                value = self._items[key] = make()
                return value

    def values(self) -> list[T]:
        """The values made so far."""
        return list(self._items.values())

    def take_all(self) -> list[T]:
        """Every value made so far, which this no longer holds."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        return items
