"""Runs that miss the module cache for the same module at once share one compile.

Each compile is a worker process costing an interpreter start plus wasmtime's work: N
identical compiles on 2 cores cost N times the CPU and blew every run's compile budget.
The compile entry point is wrapped here to count (and, where a test needs an order of
events, to hold back) calls; every call still runs the real worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import wasmtime

from wasmbox import Sandbox, Status, Task
from wasmbox.errors import ModuleRejected
from wasmbox.tiers.wasm import cache as cache_module
from wasmbox.tiers.wasm.cache import ModuleCache, Prepared
from wasmbox.tiers.wasm.engine import EngineHandle, Flavour

pytestmark = pytest.mark.timeout(120, method="thread")
MakeSandbox = Callable[..., Sandbox]
Compile = Callable[..., tuple[bytes, float]]
RUNS = 6


def _unseen(wat: str) -> bytes:
    """`wat` compiled, with a unique custom section: no cache has seen these bytes."""
    tag = uuid.uuid4().hex.encode()
    return bytes(wasmtime.wat2wasm(wat)) + b"\x00" + bytes([len(tag) + 2, 1]) + b"t" + tag


def fresh_module() -> bytes:
    """A WASI-command-shaped module no cache has seen."""
    return _unseen('(module (memory (export "memory") 1) (func (export "_start")))')


def invalid_module() -> bytes:
    return b"\0asm\x01\0\0\0\x01\x05" + uuid.uuid4().bytes  # a truncated type section


def no_start_module() -> bytes:
    """Valid WebAssembly, but not a WASI command (no ``_start``)."""
    return _unseen('(module (memory (export "memory") 1))')


class CountedCompile:
    """`compile_in_worker`, counted; the first call can be held until `release` is set."""

    def __init__(self, real: Compile, *, hold_first: bool = False,
                 first_raises: BaseException | None = None) -> None:
        self.real = real
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first and first_raises is None:
            self.release.set()
        self.first_raises = first_raises
        self._lock = threading.Lock()

    def __call__(self, *args: object, **kwargs: object) -> tuple[bytes, float]:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.started.set()
            assert self.release.wait(60)
            if self.first_raises is not None:
                raise self.first_raises
        return self.real(*args, **kwargs)


@pytest.fixture
def module_cache_only() -> Iterator[ModuleCache]:
    """A memory-only cache on its own engine, so every module starts as a miss."""
    with EngineHandle(Flavour(fuel=True, stack=1 << 20)) as handle:
        cache = ModuleCache(handle, None)
        yield cache
        cache.clear()


def counted(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> CountedCompile:
    wrapper = CountedCompile(cache_module.compile_in_worker, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(cache_module, "compile_in_worker", wrapper)
    return wrapper


def wait_for_waiters(cache: ModuleCache, data: bytes, count: int) -> None:
    """Block until `count` runs wait on the compile of `data` (a behaviour bound, not timing)."""
    digest = cache._digest(data)
    for _ in range(6000):
        flight = cache._inflight.get(digest)
        if flight is not None and flight.waiters >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} waiters never arrived")


def load_all(cache: ModuleCache, data: bytes, timeout: float | None
             ) -> list[Prepared | BaseException]:
    barrier = threading.Barrier(RUNS)

    def load(_: int) -> Prepared | BaseException:
        barrier.wait()
        try:
            return cache.load_bytes(data, None, timeout)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(RUNS) as pool:
        return list(pool.map(load, range(RUNS)))


def test_concurrent_misses_on_one_module_compile_it_once(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_ = counted(monkeypatch)
    data = fresh_module()
    results = load_all(module_cache_only, data, timeout=30)
    assert compile_.calls == 1
    assert all(r is results[0] for r in results)
    assert isinstance(results[0], Prepared)
    digest = results[0].sha256
    assert module_cache_only.claim_compile_s(digest) > 0  # charged once, to one run
    assert module_cache_only.claim_compile_s(digest) == 0.0
    assert not module_cache_only._inflight


def test_a_concurrent_batch_compiles_once_and_reports_it_once(
    make_sandbox: MakeSandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compile_ = counted(monkeypatch)
    task = Task.wasm(fresh_module())
    with make_sandbox(cache=tmp_path) as sandbox:
        results = sandbox.map([task] * RUNS, concurrency=RUNS)
    assert [r.status for r in results] == [Status.COMPLETED] * RUNS
    assert compile_.calls == 1
    charged = [r.metrics.extra["compile_s"] for r in results]
    assert sum(1 for c in charged if c > 0) == 1


def test_an_invalid_module_fails_every_waiter_with_the_leaders_refusal(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_ = counted(monkeypatch, hold_first=True)
    data = invalid_module()
    releaser = threading.Thread(target=lambda: (wait_for_waiters(module_cache_only, data,
                                                                 RUNS - 1),
                                                compile_.release.set()))
    releaser.start()
    # No timeout: a waiter left waiting would sit out its full 60 s budget and then say
    # "took longer than its budget", not the validator's reason.
    results = load_all(module_cache_only, data, timeout=None)
    releaser.join()
    assert compile_.calls == 1
    for result in results:
        assert isinstance(result, ModuleRejected)
        assert "not a valid WebAssembly module" in str(result)
    assert not module_cache_only._inflight


def test_a_waiter_gives_up_at_its_own_budget_while_the_leader_compiles(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_ = counted(monkeypatch, hold_first=True)
    data = fresh_module()
    led: list[Prepared] = []
    leader = threading.Thread(target=lambda: led.append(
        module_cache_only.load_bytes(data, None, None)))
    leader.start()
    try:
        assert compile_.started.wait(60)
        with pytest.raises(ModuleRejected, match="took longer than its 2 s budget") as info:
            module_cache_only.load_bytes(data, None, 0.5)
        assert info.type is ModuleRejected  # a public error type, as before
        assert leader.is_alive()  # still compiling: the waiter did not wait for it
    finally:
        compile_.release.set()
        leader.join()
    assert compile_.calls == 1
    assert isinstance(led[0], Prepared)
    assert not module_cache_only._inflight


def test_an_interrupted_leader_lets_a_waiter_compile(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_ = counted(monkeypatch, first_raises=KeyboardInterrupt())
    data = fresh_module()
    interrupted: list[BaseException] = []

    def lead() -> None:
        try:
            module_cache_only.load_bytes(data, None, None)
        except KeyboardInterrupt as exc:
            interrupted.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()
    try:
        assert compile_.started.wait(60)
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(module_cache_only.load_bytes, data, None, None)
            wait_for_waiters(module_cache_only, data, 1)
            compile_.release.set()
            assert isinstance(waiter.result(), Prepared)
    finally:
        compile_.release.set()
        leader.join()
    assert interrupted
    assert compile_.calls == 2
    assert not module_cache_only._inflight


def test_a_leader_over_its_budget_lets_a_waiter_with_more_time_compile(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_module.compile_in_worker
    calls: list[float] = []
    started = threading.Event()
    data = fresh_module()

    def compile_(flavour: Flavour, module: bytes, budget: float) -> tuple[bytes, float]:
        calls.append(budget)
        if len(calls) == 1:
            started.set()  # the leader: hold it until the waiter waits, then starve it
            wait_for_waiters(module_cache_only, data, 1)
            budget = 0.001
        return real(flavour, module, budget)

    monkeypatch.setattr(cache_module, "compile_in_worker", compile_)
    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(module_cache_only.load_bytes, data, None, 0.5)
        assert started.wait(60)
        prepared = module_cache_only.load_bytes(data, None, None)
        with pytest.raises(ModuleRejected, match="budget") as info:
            leader.result()
        assert info.type is ModuleRejected
    assert isinstance(prepared, Prepared)
    assert len(calls) == 2
    assert not module_cache_only._inflight


@pytest.mark.parametrize(("make", "why"), [
    (invalid_module, "not a valid WebAssembly module"),
    (no_start_module, "exports no _start"),
])
def test_refused_bytes_sent_again_are_refused_without_another_compile(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], bytes], why: str,
) -> None:
    compile_ = counted(monkeypatch)
    data = make()
    for _ in range(3):
        with pytest.raises(ModuleRejected, match=why) as info:
            module_cache_only.load_bytes(data, None, 5.0)
        assert info.type is ModuleRejected  # a public error type, the first time and after
    assert compile_.calls == 1


def test_remembered_refusals_are_bounded(
    module_cache_only: ModuleCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "_REFUSED_ENTRIES", 2)
    compile_ = counted(monkeypatch)
    first, second, third = invalid_module(), invalid_module(), invalid_module()
    for data in (first, second, third, third, first):
        with pytest.raises(ModuleRejected):
            module_cache_only.load_bytes(data, None, 5.0)
    # `first` was forgotten when `third` came: it costs a compile again; `third` did not.
    assert compile_.calls == 4
    assert len(module_cache_only._refused) == 2


def test_a_sandbox_refuses_a_resent_invalid_module_without_another_compile(
    make_sandbox: MakeSandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compile_ = counted(monkeypatch)
    task = Task.wasm(invalid_module())
    with make_sandbox(cache=tmp_path) as sandbox:
        for _ in range(3):
            with pytest.raises(ModuleRejected, match="not a valid WebAssembly module"):
                sandbox.run(task)
        assert sandbox.run(Task.wasm(fresh_module())).status is Status.COMPLETED
    assert compile_.calls == 2  # the bad bytes once, the good module once
