"""WASI module runs on the pooling instance allocator: what the pool must not change."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import wasmtime

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox.lifecycle import Deadline
from wasmbox.models import Limits
from wasmbox.tiers.wasm.engine import POOL_RUNS
from wasmbox.tiers.wasm.tier import _take_slot

MakeSandbox = Callable[..., Sandbox]

# Fails (unreachable) if its memory is not zero at 64 KiB (inside the part a pool slot keeps
# resident) or at 2 MiB (beyond it), then leaves a mark at both: a later run that sees a
# mark got an earlier run's memory back.
_MARKER = """(module
  (memory (export "memory") 40)
  (func $check_and_mark (param $at i32)
    (if (i32.ne (i32.load (local.get $at)) (i32.const 0)) (then unreachable))
    (i32.store (local.get $at) (i32.const 0x5ec7e7)))
  (func (export "_start")
    (call $check_and_mark (i32.const 65536))
    (call $check_and_mark (i32.const 2097152))))"""


def test_a_pooled_memory_comes_back_zeroed(sandbox: Sandbox) -> None:
    task = Task.wasm(wasmtime.wat2wasm(_MARKER))
    for _ in range(3):
        r = sandbox.run(task)
        assert r.status is Status.COMPLETED, r.reason


def test_a_table_larger_than_a_pool_slot_still_runs(make_sandbox: MakeSandbox) -> None:
    # The pool's table slots hold 100 000 elements; the policy allows more, so the
    # module runs on the on-demand engine rather than failing to load.
    wat = '(module (memory (export "memory") 1) (table 150000 funcref) (func (export "_start")))'
    with make_sandbox(Policy(limits=Limits(table_elements=300_000))) as sb:
        r = sb.run(Task.wasm(wasmtime.wat2wasm(wat)))
    assert r.status is Status.COMPLETED, r.reason


def test_more_runs_at_once_than_pool_slots_all_complete(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    # Every guest sleeps long enough for all of them to be running at once: the runs past
    # the pool's size wait for a slot instead of failing to instantiate.
    extra = 4
    task = Task.wasm(guests["sleep_long"], args=["rel", "1500"])
    with make_sandbox() as sb:
        assert sb.run(Task.wasm(guests["sleep_long"], args=["rel", "1"])).ok  # compiled once
        results = sb.map([task] * (POOL_RUNS + extra), concurrency=POOL_RUNS + extra)
    assert [r.status for r in results] == [Status.COMPLETED] * (POOL_RUNS + extra), {
        r.reason for r in results if not r.ok}


def test_a_run_waiting_for_a_slot_stops_waiting_when_cancelled() -> None:
    # An unbounded run (no timeout) waiting for a full pool must still see its cancel.
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # the pool is full
    deadline = Deadline(None)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(_take_slot(slots, deadline)),
                              daemon=True)
    waiter.start()
    deadline.cancel()
    waiter.join(timeout=30)  # a bound on a hang, not a measurement
    assert not waiter.is_alive()
    assert got == [False]
