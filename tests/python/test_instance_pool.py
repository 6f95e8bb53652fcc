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
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.instance_pool import InstancePool

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
    end = time.monotonic() + WAIT_S
    while pool.ready < 1:
        assert time.monotonic() < end, "the pool never made an instance"
        time.sleep(0.01)


def _pooled_run(sb: Sandbox, pool: InstancePool, source: str, **fields: object) -> Result:
    """Run `source` on an instance the pool made beforehand (asserts it was one)."""
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
    """Instantiating burns fuel; a pooled run is charged it as a fresh one is."""
    sb = _sandbox(tier)
    pool = _pool(tier)
    source = "def main(inp):\n    return sum(range(1000))\n"
    sb.run(Task.python(source, tier=TierName.WASM))
    pooled = _pooled_run(sb, pool, source).metrics.fuel_consumed
    pool.size = 0  # every take misses: the fresh path
    hits = pool.hits
    fresh = sb.run(Task.python(source, tier=TierName.WASM)).metrics.fuel_consumed
    assert pool.hits == hits
    assert pooled is not None and pooled == fresh


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
