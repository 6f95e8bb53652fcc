"""Internal: pre-instantiated Python interpreters, instantiation (~1.5 ms) off the path.

A Python task runs in a fresh instance of the CPython component in a fresh Store. Making that
instance does not depend on the task, only on the limits it is made under, so a background
thread makes the next ones while the current task runs. Each pooled instance

* is made in a Store of its own with an empty WASI configuration (no preopens, no env, no
  stdio). The component calls no WASI function while it instantiates and wasmtime looks the
  WASI state up on every call, so the task's ``set_wasi`` (in `_execute`) gives it exactly
  its own world (``tests/test_instance_pool.py`` checks that a pooled instance sees the
  task's files, not the empty or any earlier configuration);
* is made under the store limits the task's plan applies (`limit_store`), and the pool is
  keyed by them: an instantiation that would fail under the plan fails here too, and the
  task takes the fresh path, which reports it as before. Fuel is not part of the key: the
  fuel instantiating burnt is handed over (`Pooled.fuel_spent`) so the task's budget and its
  ``fuel_consumed`` match the fresh path, and a budget it would not cover is a miss;
* is handed out once and never comes back.

A taken instance is replaced once its task is done (`retire`), not while its guest runs:
on 2 shared cores, an instance made during the run slowed that run by about what it saved.

No watchdog runs during a pooled instantiation (the epoch deadline is far away): it runs our
own component with no task code in it. One key is kept at a time (the last one asked for), so
at most `size` instances exist beyond the running ones; a plan with other limits drops them
and the pool refills for it. A failed instantiation stops refilling that key (its tasks take
the fresh path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import wasmtime
from wasmtime import component

from wasmbox.lifecycle import Closeable
from wasmbox.tiers.wasm.run import close_store

DEFAULT_SIZE = 2
# Epoch ticks a pooled instantiation may take (5 ms each): no limit in practice, the
# component is ours and instantiating it runs no task code.
_FAR_EPOCH = 1 << 40


@dataclass
class Pooled:
    """A fresh instance in its own Store, never used before."""

    store: wasmtime.Store
    instance: component.Instance
    fuel_spent: int


Setup = Callable[[wasmtime.Store], None]


class InstancePool(Closeable):
    """Keeps up to `size` component instances ready for the last key asked for. Thread-safe."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self.made = 0
        self._ready: list[Pooled] = []
        self._key: Hashable | None = None
        self._make: Callable[[], Pooled] | None = None
        self._failed: set[Hashable] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def take(
        self, key: Hashable, engine: wasmtime.Engine, linker: component.Linker,
        comp: component.Component, setup: Setup, fuel: int | None,
    ) -> Pooled | None:
        """A ready instance made under `key`, or None (the caller instantiates as before).

        `setup` applies the plan's store limits and fuel to a new Store (`fuel` is the plan's
        budget, or None without fuel); `key` must name everything but the fuel that `setup`
        and the instantiation depend on. Asking starts (or retargets) the background refill
        for `key`.
        """
        if self.size <= 0:
            return None
        with self._cond:
            if self._closed or key in self._failed:
                self.misses += 1
                return None
            if self._key != key:
                stale, self._ready = self._ready, []
                self._key = key
                self._make = lambda: _instantiate(engine, linker, comp, setup, fuel)
            else:
                stale = []
            found = self._ready.pop() if self._ready else None
            if found is not None and fuel is not None and found.fuel_spent >= fuel:
                stale.append(found)  # the fresh path runs out of fuel instantiating
                found = None
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            self._start()
            if found is None:
                # Otherwise the refill waits for `retire`: made while the task runs, it
                # slows the task's guest by about what it saves (measured; 2 shared cores).
                self._cond.notify_all()
        for pooled in stale:
            pooled.store.close()
        return found

    def retire(self, store: wasmtime.Store) -> None:
        """Close a finished task's `store` (as `run.close_store`), then let the refill start.

        The refill waits for this: an instance made while a task's guest runs slows that
        guest by about what it saves. Deleting the store here, not on the pool's thread, is
        measured too: a background unmap of the CPython memory slowed the next guest more.
        """
        close_store(store)
        with self._cond:
            self._cond.notify_all()

    @property
    def ready(self) -> int:
        """Instances made and not yet taken."""
        with self._cond:
            return len(self._ready)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill, name="wasmbox-instance-pool",
                                            daemon=True)
            self._thread.start()

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._make is None or len(self._ready) >= self.size):
                    self._cond.wait()
                if self._closed:
                    return
                key, make = self._key, self._make
            assert make is not None
            try:
                pooled = make()
            except Exception:  # the task's own fresh instantiation reports why
                with self._cond:
                    self._failed.add(key)
                    if self._key == key:
                        self._make = None
                continue
            with self._cond:
                keep = not self._closed and self._key == key and len(self._ready) < self.size
                if keep:
                    self._ready.append(pooled)
                    self.made += 1
            if not keep:
                pooled.store.close()

    def _release(self) -> None:
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            stale, self._ready = self._ready, []
        for pooled in stale:
            pooled.store.close()


def _instantiate(engine: wasmtime.Engine, linker: component.Linker, comp: component.Component,
                 setup: Setup, fuel: int | None) -> Pooled:
    store = wasmtime.Store(engine)
    try:
        store.set_wasi(wasmtime.WasiConfig())  # nothing: the task's own replaces it
        setup(store)
        store.set_epoch_deadline(_FAR_EPOCH)
        instance = linker.instantiate(store, comp)
        spent = 0 if fuel is None else fuel - store.get_fuel()
        return Pooled(store, instance, spent)
    except BaseException:
        store.close()
        raise
