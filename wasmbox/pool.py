"""Pre-warmed sandboxes, one abstraction for every tier.

A `Pool` keeps up to `size` ready items of the shape asked for most recently (a container
created but not started, a VM booted and waiting), refilled by one background thread. An
item is handed out once and never comes back: the caller destroys it after its one task, so
nothing of one task can reach another. Hits and misses are Prometheus counters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from wasmbox import telemetry
from wasmbox.lifecycle import Closeable

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_log = logging.getLogger(__name__)
_RETRY_AFTER_FAILURE = 1.0
_MAX_BACKOFF = 60.0


class Pool(Closeable, Generic[K, T]):
    """Up to `size` ready items of the current shape.

    `create(shape)` makes an item (in the refill thread), `destroy(item)` releases one that is
    never handed out, `usable(item)` says whether an idle item is still good (a VM that died
    while waiting is not). `take` never blocks on creation: a miss returns None and the
    caller makes one on its own critical path. With `grow_to`, each miss raises the target
    by one, up to `grow_to`, so a pool that runs dry under load keeps more ready.
    """

    def __init__(
        self,
        tier: str,
        size: int,
        create: Callable[[K], T],
        destroy: Callable[[T], None],
        usable: Callable[[T], bool] = lambda item: True,
        grow_to: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs size >= 1")
        self._tier = tier
        self._size = size
        self._max_size = max(size, grow_to or size)
        self._create = create
        self._destroy = destroy
        self._usable = usable
        self._shape: K | None = None
        self._items: list[tuple[K, T]] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._refill, name=f"wasmbox-pool-{tier}",
                                        daemon=True)
        self._thread.start()

    def warm(self, shape: K) -> None:
        """Keep items of `shape` from now on; items of another shape are destroyed."""
        with self._changed:
            self._shape = shape
            self._changed.notify_all()

    def take(self, shape: K) -> T | None:
        """A ready item of `shape`, removed from the pool for good, or None on a miss."""
        found: T | None = None
        stale: list[T] = []
        with self._changed:
            self._shape = shape
            while self._items:
                item_shape, item = self._items.pop(0)
                if item_shape == shape and self._usable(item):
                    found = item
                    break
                stale.append(item)
            if found is None:
                self._size = min(self._size + 1, self._max_size)
            self._changed.notify_all()
        for item in stale:
            self._destroy_quietly(item)
        telemetry.POOL_REQUESTS.labels(self._tier, "hit" if found is not None else "miss").inc()
        return found

    @property
    def idle(self) -> int:
        """Items waiting in the pool."""
        with self._changed:
            return len(self._items)

    @property
    def size(self) -> int:
        """How many items the pool keeps ready now (grows on misses up to `grow_to`)."""
        return self._size

    def idle_items(self) -> list[T]:
        """The waiting items, for inspection only: they stay in the pool, never use them."""
        with self._changed:
            return [item for _, item in self._items]

    def wait_filled(self, timeout: float) -> bool:
        """Block until the pool holds `size` items of the current shape (for tests, benches)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.closed
                or sum(1 for s, _ in self._items if s == self._shape) >= self._size,
                timeout,
            ) and not self.closed

    def _refill(self) -> None:
        failures = 0
        while True:
            with self._changed:
                while not self.closed and (
                    self._shape is None or len(self._items) >= self._size
                ) and not self._has_stale():
                    self._changed.wait()
                if self.closed:
                    return
                stale = [item for s, item in self._items if s != self._shape]
                self._items = [(s, item) for s, item in self._items if s == self._shape]
                shape = self._shape
                wanted = shape is not None and len(self._items) < self._size
            for item in stale:
                self._destroy_quietly(item)
            if not wanted or shape is None:
                continue
            try:
                item = self._create(shape)
            except Exception as exc:
                # Back off (1 s, doubling to a minute) and log once per failure streak, so a
                # shape that can never be made costs neither a busy loop nor a flood of logs.
                if failures == 0:
                    _log.exception("pool %s: could not make a sandbox", self._tier)
                else:
                    _log.debug("pool %s: still failing: %s", self._tier, exc)
                delay = min(_RETRY_AFTER_FAILURE * 2**failures, _MAX_BACKOFF)
                failures += 1
                with self._changed:
                    self._changed.wait(delay)
                continue
            failures = 0
            with self._changed:
                if self.closed or shape != self._shape:
                    keep = False
                else:
                    self._items.append((shape, item))
                    keep = True
                self._changed.notify_all()
            if not keep:
                self._destroy_quietly(item)

    def _has_stale(self) -> bool:
        return any(s != self._shape for s, _ in self._items)

    def _destroy_quietly(self, item: T) -> None:
        try:
            self._destroy(item)
        except Exception:
            _log.exception("pool %s: could not destroy a sandbox", self._tier)

    def _release(self) -> None:
        with self._changed:
            self._changed.notify_all()
        self._thread.join()
        with self._changed:
            items, self._items = self._items, []
        for _, item in items:
            self._destroy_quietly(item)
