"""The pre-instantiated Python interpreters (`instance_pool`): each task still gets a fresh
interpreter that sees only its own files, under the same fuel budget as the fresh path; a
failed or empty pool falls back to instantiating inline; closing the tier leaves nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasmbox import Policy, Result, Sandbox, Status, Task
from wasmbox.models import Limits, Resources, TierName
from wasmbox.tiers.wasm import WasmTier, _python_exec, instance_pool, python
from wasmbox.tiers.wasm._python_exec import warm_up
from wasmbox.tiers.wasm.instance_pool import InstancePool, Pooled

WAIT_S = 120.0  # how long a pooled instance may take to appear on a loaded machine


@pytest.fixture
def tier(python_cache: Path) -> Iterator[WasmTier]:
    with WasmTier(python_cache) as tier:
        yield tier


def _sandbox(tier: WasmTier, policy: Policy | None = None) -> Sandbox:
    return Sandbox(policy or Policy(), tiers={TierName.WASM: lambda: tier})


def _pool(tier: WasmTier) -> InstancePool:
    return tier._python_runtime().pool


def _wait_ready(pool: InstancePool) -> None:
    """Until a warmed instance is ready (between tasks the pool fills, then warms)."""
    end = time.monotonic() + WAIT_S
    while pool.warmed < 1:
        assert time.monotonic() < end, "the pool never made and warmed an instance"
        time.sleep(0.01)


def _pooled_run(sb: Sandbox, pool: InstancePool, source: str, **fields: object) -> Result:
    """Run `source` on a warmed instance the pool made beforehand (asserts it was one)."""
    _wait_ready(pool)
    hits = pool.hits
    result = sb.run(Task.python(source, tier=TierName.WASM, **fields))
    assert pool.hits == hits + 1
    return result


def test_every_pooled_task_gets_a_fresh_interpreter(tier: WasmTier) -> None:
    sb = _sandbox(tier)
    pool = _pool(tier)
    dirty = ("import builtins, json\n"
             "def main(inp):\n"
             "    json.MARK = 1\n"
             "    builtins.LEAK = 'x'\n"
             "    return 'dirty'\n")
    probe = ("import builtins, json\n"
             "def main(inp):\n"
             "    return [hasattr(json, 'MARK'), hasattr(builtins, 'LEAK')]\n")
    sb.run(Task.python(dirty, tier=TierName.WASM))  # starts the pool
    assert _pooled_run(sb, pool, dirty).output == "dirty"
    assert _pooled_run(sb, pool, probe).output == [False, False]


def test_a_pooled_interpreter_sees_only_its_own_task(tier: WasmTier) -> None:
    """Made under an empty WASI world: the task's set_wasi must be what it sees."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    source = ("import os\n"
              "def main(inp):\n"
              "    before = sorted(os.listdir('/task/output'))\n"
              "    with open(f\"/task/output/mine-{inp['n']}.txt\", 'w') as f:\n"
              "        f.write('x')\n"
              "    print('task', inp['n'])\n"
              "    return {'n': inp['n'], 'before': before,\n"
              "            'task': sorted(os.listdir('/task'))}\n")
    sb.run(Task.python(source, tier=TierName.WASM, input={"n": 0}))
    for n in (1, 2, 3):
        r = _pooled_run(sb, pool, source, input={"n": n})
        assert r.status is Status.COMPLETED, r.reason
        assert r.output == {"n": n, "before": [], "task": ["input.json", "output"]}
        assert r.stdout == f"task {n}\n"
        assert sorted(r.files) == [f"mine-{n}.txt", "result.json"]


def test_fuel_is_the_same_budget_as_the_fresh_path(tier: WasmTier) -> None:
    """Instantiating and the first call's lazy start burn fuel; a pooled run is charged
    them as a fresh one is (the warm-up's own call is not charged)."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    source = "def main(inp):\n    return sum(range(1000))\n"
    sb.run(Task.python(source, tier=TierName.WASM))
    pooled = _pooled_run(sb, pool, source).metrics.fuel_consumed
    pool.size = 0  # every take misses: the fresh path
    hits = pool.hits
    fresh = sb.run(Task.python(source, tier=TierName.WASM)).metrics.fuel_consumed
    assert pool.hits == hits
    assert pooled is not None and fresh is not None
    # Not repeatable to the unit run to run (the interpreter reads the clock). The warmed
    # instance is charged the lazy start its warm-up took (~0.4 M of ~1.3 M fuel here).
    assert abs(pooled - fresh) <= fresh // 20


def test_an_interpreter_too_big_for_the_cap_is_reported_as_before(tier: WasmTier) -> None:
    """The pool's failed instantiation is not the task's outcome: the fresh path reports it."""
    sb = _sandbox(tier, Policy(limits=Limits(memory=1 << 20)))
    pool = _pool(tier)
    for _ in range(3):
        r = sb.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
        assert r.status is Status.MEMORY_EXCEEDED, r.reason
        assert "interpreter needs more than" in (r.reason or "")
    assert pool.hits == 0
    # Other limits are another key: the failure above does not stop the pool for them.
    ok = _sandbox(tier)
    ok.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
    assert _pooled_run(ok, pool, "def main(inp):\n    return 2\n").output == 2


def test_an_empty_pool_falls_back_to_instantiating_inline(tier: WasmTier) -> None:
    sb = _sandbox(tier)
    pool = _pool(tier)
    pool.size = 1
    results = [sb.run(Task.python("def main(inp):\n    return inp\n", tier=TierName.WASM,
                                  input=i)) for i in range(6)]
    assert [r.output for r in results] == list(range(6))
    assert pool.misses >= 1  # the first take at least found nothing ready


def test_closing_the_tier_releases_the_pool(python_cache: Path) -> None:
    tier = WasmTier(python_cache)
    sb = _sandbox(tier)
    pool = _pool(tier)
    sb.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
    _wait_ready(pool)
    tier.close()
    assert pool.closed and pool.ready == 0
    assert not [t for t in threading.enumerate() if t.name == "wasmbox-instance-pool"
                and t.is_alive()]


def test_a_retired_store_is_closed_at_once_and_the_pool_refills(tier: WasmTier) -> None:
    """`retire` is the task's store close: nothing of a finished task is kept for later."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    sb.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
    _wait_ready(pool)
    store = wasmtime.Store(wasmtime.Engine())
    pool.retire(store)
    pool.retire(store)  # idempotent, like close_store
    with pytest.raises(ValueError, match="already closed"):
        store._context()
    for _ in range(3):  # every take is replaced once its task is done
        assert _pooled_run(sb, pool, "def main(inp):\n    return 2\n").output == 2


def _outcome(sb: Sandbox, task: Task) -> str:
    """What the caller sees of `task`: its status, or the exception's type."""
    try:
        return str(sb.run(task).status)
    except Exception as exc:
        return type(exc).__name__


def test_fuel_is_not_part_of_the_key_and_a_budget_below_instantiating_is_a_miss(
        tier: WasmTier) -> None:
    sb = _sandbox(tier)
    pool = _pool(tier)
    sb.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
    big = _pooled_run(sb, pool, "def main(inp):\n    return 3\n", resources=Resources(fuel=10**9))
    assert big.output == 3
    tiny = Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM,
                       resources=Resources(fuel=1000))  # less than instantiating burns
    _wait_ready(pool)
    hits = pool.hits
    pooled = _outcome(sb, tiny)
    assert pool.hits == hits  # not served from the pool: the fresh path decided
    pool.size = 0
    assert pooled == _outcome(sb, tiny)


# --- warm-up: each pooled instance's first call is ours; the task sees none of it ---------

_WORLD = ("import os, sys\n"
          "def main(inp):\n"
          "    return {'env': dict(os.environ), 'argv': sys.argv}\n")


def _fresh(sb: Sandbox, pool: InstancePool, task: Task) -> Result:
    """`task` on the fresh path (the pool serves nothing meanwhile)."""
    size, pool.size = pool.size, 0
    try:
        return sb.run(task)
    finally:
        pool.size = size


def test_a_warmed_interpreter_sees_the_tasks_own_env_and_argv(tier: WasmTier) -> None:
    """The interpreter reads env and argv once, on its first call (the warm-up): the pool
    is keyed by the env, so an instance warmed under another env is never handed out."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    for value in ("a", "b", "a"):
        sb.run(Task.python(_WORLD, tier=TierName.WASM, env={"FOO": value}))
        r = _pooled_run(sb, pool, _WORLD, env={"FOO": value})
        assert r.output == {"env": {"FOO": value}, "argv": ["python"]}


def test_a_pooled_task_runs_in_an_instance_our_warm_up_called_first(
        tier: WasmTier, monkeypatch: pytest.MonkeyPatch) -> None:
    warmed: list[wasmtime.Store] = []

    def spy(store: wasmtime.Store, instance: object, fuel: bool) -> int:
        warmed.append(store)
        return warm_up(store, instance, fuel)  # type: ignore[arg-type]

    monkeypatch.setattr(python, "warm_up", spy)
    sb = _sandbox(tier)
    pool = _pool(tier)
    taken: list[Pooled | None] = []
    take = pool.take
    monkeypatch.setattr(pool, "take", lambda *a: taken.append(take(*a)) or taken[-1])
    sb.run(Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM))
    assert _pooled_run(sb, pool, "def main(inp):\n    return 2\n").output == 2
    found = taken[-1]
    assert found is not None and found.warmed and found.store in warmed


def test_the_componentize_py_probe_is_made_once(
        tier: WasmTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prepare asks for availability: the package metadata is read once."""
    calls: list[str] = []
    real = python.version
    monkeypatch.setattr(python, "version", lambda name: calls.append(name) or real(name))
    runtime = python.PythonRuntime(None, lambda flavour: tier._engine_for(flavour)[0])
    with runtime:
        assert all(runtime.availability().ok for _ in range(3))
    assert calls == ["componentize-py"]


def test_a_warm_up_that_returns_the_wrong_value_stops_the_pool_for_that_key(
        tier: WasmTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter whose warm-up did not answer what it should is never handed out:
    the key fails and its tasks take the fresh path, which still runs them."""
    monkeypatch.setattr(_python_exec, "_WARM_VALUE", '"not what it returns"')
    sb = _sandbox(tier)
    pool = _pool(tier)
    task = Task.python("def main(inp):\n    return 1\n", tier=TierName.WASM)
    assert sb.run(task).output == 1  # starts the pool
    end = time.monotonic() + WAIT_S
    while not pool._failed and pool.warmed < 1:
        assert time.monotonic() < end, "the pool never tried to warm an instance"
        time.sleep(0.01)
    assert pool._failed and pool.warmed == 0
    hits = pool.hits
    assert sb.run(task).output == 1
    assert pool.hits == hits


_FAILING = {
    "raises": "def main(inp):\n    print('partial')\n    raise ValueError('boom')\n",
    "exits": "import sys\ndef main(inp):\n    sys.exit(3)\n",
    "not json": "def main(inp):\n    return {1, 2}\n",
    "script": "import sys\nprint('out')\nprint('err', file=sys.stderr)\n",
    "loops": "def main(inp):\n    while True:\n        pass\n",
    "files": ("def main(inp):\n"
              "    open('/task/output/a.txt', 'w').write('x')\n"
              "    return inp\n"),
}


@pytest.mark.parametrize("name", sorted(_FAILING))
def test_a_pooled_task_reports_exactly_as_on_the_fresh_path(tier: WasmTier, name: str) -> None:
    """Status, reason, exit code, trap, streams, output and files: nothing of the warm-up
    shows, and a task that fails, exits or runs out of fuel reports as before."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    fields: dict[str, object] = {"input": {"k": [1, 2]}, "resources": Resources(fuel=2 * 10**8)}
    task = Task.python(_FAILING[name], tier=TierName.WASM, **fields)  # type: ignore[arg-type]
    fresh = _fresh(sb, pool, task)
    sb.run(task)  # the pool's key is this task's
    pooled = _pooled_run(sb, pool, _FAILING[name], **fields)

    def seen(r: Result) -> tuple[object, ...]:
        return (r.status, r.exit_code, r.trap, r.reason, r.stdout, r.stderr, r.output,
                r.files)

    assert seen(pooled) == seen(fresh)


# --- when instances are made: between tasks; a task waits for the one being made ---------


class _SlowMake:
    """Stands in for `_instantiate`: counts calls, each takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.started = threading.Event()

    def __call__(self, engine: wasmtime.Engine, *_: object) -> Pooled:
        self.calls += 1
        self.started.set()
        time.sleep(self.seconds)
        return Pooled(wasmtime.Store(engine), None, 0)  # type: ignore[arg-type]


def _take(pool: InstancePool, engine: wasmtime.Engine) -> Pooled | None:
    return pool.take("key", engine, None, None, lambda s: None, None,  # type: ignore[arg-type]
                     lambda s, i, f: 0)


@pytest.fixture
def slow_make(monkeypatch: pytest.MonkeyPatch) -> _SlowMake:
    make = _SlowMake(0.03)
    monkeypatch.setattr(instance_pool, "_instantiate", make)
    return make


def test_no_instance_is_made_while_a_task_runs(slow_make: _SlowMake) -> None:
    engine = wasmtime.Engine()
    with InstancePool(size=1) as pool:
        assert _take(pool, engine) is None  # the task now runs on the fresh path
        time.sleep(0.1)
        assert slow_make.calls == 0
        pool.retire(None)
        assert slow_make.started.wait(WAIT_S)


def test_a_task_waits_for_the_instance_being_made(
        slow_make: _SlowMake, monkeypatch: pytest.MonkeyPatch) -> None:
    # A generous wait: a loaded machine may be slow to schedule the 30 ms make; without the
    # wait at all, take returns None at once and the test fails.
    monkeypatch.setattr(instance_pool, "WAIT_S", WAIT_S)
    engine = wasmtime.Engine()
    with InstancePool(size=1) as pool:
        assert _take(pool, engine) is None
        pool.retire(None)
        assert slow_make.started.wait(WAIT_S)  # being made now, not ready yet
        found = _take(pool, engine)
        assert found is not None and pool.hits == 1
        pool.retire(found.store)
