"""The container tier's pool: a container serves one task, hits and misses are counted, and
a pool that runs dry grows up to `pool_max`."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from wasmbox import Sandbox, Status, Task
from wasmbox.policy import apply
from wasmbox.tiers.container import ContainerPool, ContainerTier

pytestmark = pytest.mark.container
MakeSandbox = Callable[..., Sandbox]

TRUE = Task.command(["/bin/true"])
# The host directory bound at /task: each pooled container has a staging dir of its own.
TASK_SOURCE = Task.command(["/bin/sh", "-c", "grep ' /task ' /proc/self/mountinfo | cut -d' ' -f4"])


def _count(result: str) -> float:
    value = REGISTRY.get_sample_value("wasmbox_pool_requests_total",
                                      {"tier": "container", "result": result})
    return value or 0.0


def _prewarm(sb: Sandbox, tier: ContainerTier) -> ContainerPool:
    pool = tier.prewarm(apply(sb.policy, TRUE))
    assert pool is not None
    assert pool.wait_ready(), "the pool did not fill"
    return pool


def _kill_idle(pool: ContainerPool) -> None:
    """Kill the init of every waiting container and wait until each is dead."""
    for pooled in pool.idle_items():
        assert pooled.instance.pid is not None
        fd = os.pidfd_open(pooled.instance.pid)
        try:
            os.kill(pooled.instance.pid, signal.SIGKILL)
            assert select.select([fd], [], [], 10)[0], "the init did not die"
        finally:
            os.close(fd)


def test_each_pooled_task_gets_a_fresh_container(make_csb: MakeSandbox) -> None:
    tier = ContainerTier(pool_size=1)
    sb = make_csb(tier)
    pool = _prewarm(sb, tier)
    seen = []
    for _ in range(2):
        assert pool.wait_ready()
        [waiting] = pool.idle_items()
        r = sb.run(TASK_SOURCE)
        assert (r.status, r.metrics.extra.get("pooled")) == (Status.COMPLETED, 1.0)
        assert os.path.basename(waiting.path) in r.stdout  # it ran in that container
        assert not any(waiting.instance.id in trace for trace in tier.leftovers(os.getpid()))
        seen.append((waiting.instance.id, r.stdout))
    (first_id, first_source), (second_id, second_source) = seen
    assert first_id != second_id
    assert first_source != second_source


def test_pool_hits_and_misses_are_counted(make_csb: MakeSandbox) -> None:
    tier = ContainerTier(pool_size=1)
    sb = make_csb(tier)
    pool = _prewarm(sb, tier)
    hits, misses = _count("hit"), _count("miss")
    warm = sb.run(TRUE)
    assert (_count("hit") - hits, _count("miss") - misses) == (1.0, 0.0)
    assert pool.wait_ready()
    _kill_idle(pool)  # a container whose init died is not handed out
    cold = sb.run(TRUE)
    assert (_count("hit") - hits, _count("miss") - misses) == (1.0, 1.0)
    assert warm.metrics.extra.get("pooled") == 1.0
    assert "pooled" not in cold.metrics.extra
    assert cold.status is Status.COMPLETED


def test_a_pool_that_runs_dry_grows_up_to_pool_max(make_csb: MakeSandbox) -> None:
    tier = ContainerTier(pool_size=1, pool_max=2)
    sb = make_csb(tier)
    pool = _prewarm(sb, tier)
    for _ in range(2):  # each miss grows the pool by one, never past pool_max
        _kill_idle(pool)
        assert sb.run(TRUE).status is Status.COMPLETED
        assert pool.wait_ready()
        assert (pool.size, pool.idle) == (2, 2)
