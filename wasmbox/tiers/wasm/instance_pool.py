"""Internal: pre-instantiated, warmed Python interpreters: instantiation (~1.5 ms) and the
slow first call into a new instance (~3 ms) off the path.

A Python task runs in a fresh instance of the CPython component in a fresh Store. Making that
instance does not depend on the task, only on the limits it is made under and the argv and
env the interpreter reads on its first call, so a background thread makes the next ones
between tasks. Each pooled instance

* is made in a Store of its own under a WASI world of the task's argv and env only (no
  preopens, no stdio): the interpreter reads argv and env once, on the first call, and holds
  no file or stream of the warm-up, so the task's ``set_wasi`` (``_python_exec.execute``)
  gives it exactly its own world (``tests/python/test_instance_pool.py`` checks that a
  pooled instance sees the task's files, env and streams, not the warm-up's);
* is warmed: `warm` runs a fixed call of ours (no task code, no I/O) in it once. The first
  call into a new instance touches its memory and the interpreter's lazy state, about 3x a
  later call; the task then makes the second call. `warm` must fail (raise) unless that call
  returned what it should, and the instance is dropped. Warming costs a whole extra call, so
  it is done only with time to spare: once a task finds the pool empty (back-to-back tasks)
  instances are made cold (their task's first call is its own, as on the fresh path, minus
  the instantiation) until the pool is full again between tasks, and then the cold ones
  ready are warmed;
* is made under the store limits the task's plan applies (`limit_store`), and the pool is
  keyed by them: an instantiation that would fail under the plan fails here too, and the
  task takes the fresh path, which reports it as before. Fuel is not part of the key: the
  fuel instantiating burnt, and the first call's lazy start when warmed, is handed over
  (`Pooled.fuel_spent`) so the task's budget and its ``fuel_consumed`` match the fresh path,
  and a budget it would not cover is a miss; the warm-up's own call is ours, on a budget of
  its own (`WARM_FUEL`);
* is handed out once and never comes back.

Instances are made only while no taken instance's task runs (`take` to `retire`): on 2
shared cores, an instance made during a run slowed that run by about what it saved. A task
that finds none ready while one is being made or warmed waits for it (up to `WAIT_S`): it
is ready sooner than the fresh path's instantiation and slow first call would be.

No watchdog runs during a pooled instantiation or warm-up (the epoch deadline is far away):
it runs our own component and source, no task code. One key is kept at a time (the last one
asked for), so at most `size` instances exist beyond the running ones; a plan with other
limits or env drops them and the pool refills for it. A failed instantiation or warm-up stops
refilling that key (its tasks take the fresh path).
"""

from __future__ import annotations

import threading
import time
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
# Fuel for the warm-up call, ours: hello-sized work costs about 1e6; bounded all the same.
WARM_FUEL = 1_000_000_000
# How long a task waits for the instance being made before it instantiates one itself.
WAIT_S = 0.1


@dataclass
class Pooled:
    """A fresh instance in its own Store, never used by a task before; `warmed`: our
    warm-up call was its first.

    `fuel_spent` is what the task is charged before its call, as on the fresh path: the
    instantiation, and once warmed what the first call costs beyond a later one (the
    interpreter's lazy start, ~0.4 M fuel), so its ``fuel_consumed`` and the point where its
    budget runs out are the fresh path's.
    """

    store: wasmtime.Store
    instance: component.Instance
    fuel_spent: int
    warmed: bool = False


Setup = Callable[[wasmtime.Store], None]
# Makes the first call into a new instance; with fuel (the flag), returns the fuel that first
# call burnt beyond a later call of the same work: the task is charged it (see `Pooled`).
Warm = Callable[[wasmtime.Store, component.Instance, bool], int]


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
        self._making = False  # the refill is making an instance for `_key`
        self._waiting = 0  # tasks waiting in `take` for it
        self._hurry = False  # a task found none ready: make them cold until the pool is full
        self._warm: Callable[[Pooled], None] | None = None
        self._running = 0  # taken and not yet retired
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def take(
        self, key: Hashable, engine: wasmtime.Engine, linker: component.Linker,
        comp: component.Component, setup: Setup, fuel: int | None, warm: Warm,
    ) -> Pooled | None:
        """A ready instance made under `key` (warmed, when one is), or None (the caller
        instantiates as before). Either way the caller's task now runs: it must call
        `retire` when done.

        `setup` gives a new Store the warm-up's WASI world (the task's argv and env) and
        applies the plan's store limits and fuel (`fuel` is the plan's budget, or None without
        fuel); `warm` makes the first call into the new instance. `key` must name everything
        but the fuel that `setup` and the instantiation depend on. Asking starts (or
        retargets) the background refill for `key`; when none is ready but one is being made
        or warmed for `key`, waits up to `WAIT_S` for it.
        """
        with self._cond:
            self._running += 1
            if self.size <= 0:
                return None
            if self._closed or key in self._failed:
                self.misses += 1
                return None
            if self._key != key:
                stale, self._ready = self._ready, []
                self._key = key
                self._making = False  # what is being made is for the old key: dropped
                self._make = lambda: _instantiate(engine, linker, comp, setup, fuel)
                self._warm = lambda pooled: _warm_up(pooled, fuel is not None, warm)
            else:
                stale = []
            self._start()
            if not self._ready:
                self._hurry = True  # tasks come faster than the pool warms instances
            end = time.monotonic() + WAIT_S
            self._waiting += 1
            try:
                while not self._ready and self._making and not self._closed:
                    if not self._cond.wait(max(0.0, end - time.monotonic())):
                        break
            finally:
                self._waiting -= 1
            found = self._pop()
            if found is not None and fuel is not None and found.fuel_spent >= fuel:
                stale.append(found)  # the fresh path runs out of fuel instantiating
                found = None
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        for pooled in stale:
            pooled.store.close()
        return found

    def retire(self, store: wasmtime.Store | None) -> None:
        """Close a finished task's `store` (as `run.close_store`, idempotent; None: it has
        none); once no task runs, the refill starts. Call once per `take`, on every path.

        The refill waits for this: an instance made while a task's guest runs slows that
        guest by about what it saves. Deleting the store here, not on the pool's thread, is
        measured too: a background unmap of the CPython memory slowed the next guest more.
        """
        try:
            if store is not None:
                close_store(store)
        finally:
            with self._cond:
                self._running = max(0, self._running - 1)
                self._cond.notify_all()

    @property
    def ready(self) -> int:
        """Instances made and not yet taken."""
        with self._cond:
            return len(self._ready)

    @property
    def warmed(self) -> int:
        """Ready instances whose first call (the warm-up) is done."""
        with self._cond:
            return sum(p.warmed for p in self._ready)

    def _pop(self) -> Pooled | None:
        # A warmed instance if there is one: its task skips the slow first call.
        for i in range(len(self._ready) - 1, -1, -1):
            if self._ready[i].warmed:
                return self._ready.pop(i)
        return self._ready.pop() if self._ready else None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill, name="wasmbox-instance-pool",
                                            daemon=True)
            self._thread.start()

    def _next_job(self) -> Pooled | bool | None:
        """Under the lock: True to make an instance, a cold ready one (taken out of
        `_ready`) to warm, or None to wait."""
        if self._make is None or self._running > 0:
            return None
        if len(self._ready) < self.size:
            return True
        self._hurry = False  # the pool is full between tasks: there is time to warm again
        cold = next((p for p in self._ready if not p.warmed), None)
        if cold is not None:
            self._ready.remove(cold)
        return cold

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (job := self._next_job()) is None:
                    self._cond.wait()
                if self._closed:
                    return
                key, make, warm = self._key, self._make, self._warm
                self._making = True
            assert make is not None and warm is not None
            pooled = job if isinstance(job, Pooled) else None
            try:
                if pooled is None:
                    pooled = make()
                    # A task already waiting for it (back-to-back tasks) makes its own first
                    # call, as on the fresh path: warming first would cost it a whole call.
                    if not (self._hurry or self._waiting):
                        warm(pooled)
                else:
                    warm(pooled)
            except Exception:  # the task's own fresh instantiation reports why
                if pooled is not None:
                    pooled.store.close()
                with self._cond:
                    self._failed.add(key)
                    if self._key == key:
                        self._make = None
                        self._making = False
                    self._cond.notify_all()
                continue
            with self._cond:
                keep = not self._closed and self._key == key and len(self._ready) < self.size
                if keep:
                    self._ready.append(pooled)
                    self.made += isinstance(job, bool)
                if self._key == key:
                    self._making = False
                self._cond.notify_all()
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
        setup(store)  # the warm-up's world: the task's own replaces it at take
        store.set_epoch_deadline(_FAR_EPOCH)
        instance = linker.instantiate(store, comp)
        spent = 0 if fuel is None else fuel - store.get_fuel()
        return Pooled(store, instance, spent)
    except BaseException:
        store.close()
        raise


def _warm_up(pooled: Pooled, fuel: bool, warm: Warm) -> None:
    if fuel:
        pooled.store.set_fuel(WARM_FUEL)  # ours: the task's budget is set again at take
    first_call = warm(pooled.store, pooled.instance, fuel)
    pooled.fuel_spent += max(0, first_call)  # the fresh path's first call is the task's
    pooled.warmed = True
