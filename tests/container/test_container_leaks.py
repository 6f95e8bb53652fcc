"""Nothing a container run creates outlives it: cgroups, runtime state, mounts, processes, dirs."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from wasmbox import Sandbox, Status, Task
from wasmbox.models import Resources
from wasmbox.policy import apply
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.container.runtime import Runtime

pytestmark = pytest.mark.container
MakeSandbox = Callable[..., Sandbox]


@pytest.fixture
def probe(container_ready: None) -> Iterator[ContainerTier]:
    """A tier that only looks for leftovers of the others."""
    tier = ContainerTier()
    assert tier.leftovers(os.getpid()) == [], "leftovers from before this test"
    yield tier
    tier.close()


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def test_fifty_runs_leave_nothing_behind(probe: ContainerTier, make_csb: MakeSandbox) -> None:
    with make_csb(ContainerTier()) as sb:
        for i in range(50):
            task = (Task.python("def main(i):\n    return i\n", input=i, tier="container")
                    if i % 10 == 0 else Task.command(["/bin/sh", "-c", "echo $$"]))
            assert sb.run(task).status is Status.COMPLETED
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []


def test_timeout_leaves_nothing_behind(probe: ContainerTier, make_csb: MakeSandbox) -> None:
    with make_csb(ContainerTier()) as sb:
        r = sb.run(Task.command(["/bin/sh", "-c", "sleep 100 & sleep 100 & /opt/guests/cpu_spin"],
                                resources=Resources(timeout=0.3)))
        assert r.status is Status.TIMEOUT
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []


def test_pool_close_deletes_every_pooled_container(
    probe: ContainerTier, make_csb: MakeSandbox
) -> None:
    tier = ContainerTier(pool_size=3)
    with make_csb(tier) as sb:
        pool = tier.prewarm(apply(sb.policy, Task.command(["/bin/true"])))
        assert pool is not None and pool.wait_ready()
        assert len([x for x in probe.leftovers(os.getpid()) if x.startswith("state")]) == 3
        assert sb.run(Task.command(["/bin/true"])).status is Status.COMPLETED
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []


def test_closing_a_pool_while_it_fills_and_grows_leaves_nothing(
    probe: ContainerTier, make_csb: MakeSandbox
) -> None:
    tier = ContainerTier(pool_size=2, pool_max=4)
    with make_csb(tier) as sb:
        assert tier.prewarm(apply(sb.policy, Task.command(["/bin/true"]))) is not None
        for _ in range(3):  # back to back: misses grow the pool while it is still filling
            assert sb.run(Task.command(["/bin/true"])).status is Status.COMPLETED
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []


def test_interrupted_run_leaves_nothing_behind(probe: ContainerTier, make_csb: MakeSandbox) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches only the main thread")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    with make_csb(ContainerTier()) as sb:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            sb.run(Task.command(["/opt/guests/cpu_spin"], resources=Resources(timeout=10)))
    timer.join()
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []


def test_an_interrupt_as_the_runtime_creates_the_container_leaves_nothing_behind(
    probe: ContainerTier, make_csb: MakeSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt while `crun run --detach` (or `create`) runs: the init it made (its
    pid not read yet) is still killed and reaped."""
    real = Runtime.call

    def interrupted(self: Runtime, *args: str, **kwargs: Any) -> Any:
        done = real(self, *args, **kwargs)
        if args[0] in ("run", "create"):  # the container exists, its pid file not read
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(Runtime, "call", interrupted)
    with make_csb(ContainerTier()) as sb, pytest.raises(KeyboardInterrupt):
        sb.run(Task.command(["/opt/guests/cpu_spin"], resources=Resources(timeout=10)))
    assert probe.leftovers(os.getpid()) == []
    assert _children() == []
