"""ProcessPool: spawned workers give the same results as the parent would, and leave nothing.

Workers are real processes running real sandboxes; they are killed with real signals. Where a
test waits for a worker to be busy, it watches for that worker's workspace directory (named
for its pid) to appear, so the kill lands while a task is running.
"""

from __future__ import annotations

import functools
import operator
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from wasmbox import Policy, Task
from wasmbox.errors import HostFailure, PolicyViolation, SandboxError
from wasmbox.models import Resources, Result, Status, TierName
from wasmbox.procpool import ProcessPool
from wasmbox.tiers.wasm import WasmTier
from wasmbox.workspace import PREFIX

pytestmark = pytest.mark.timeout(180)  # a hung pool fails the test instead of the run

# What differs between two runs of the same task by design.
_PER_RUN = {"run_id", "metrics"}


def _pool(module_cache: Path, processes: int = 2) -> ProcessPool:
    # A partial of a class pickles; the conftest's lambdas would not.
    return ProcessPool(Policy(), processes=processes,
                       tiers={TierName.WASM: functools.partial(WasmTier, module_cache)})


def _mixed_batch(guests: dict[str, Path]) -> list[Task]:
    return [
        Task.wasm(guests["hello"]),
        Task.wasm(guests["exit_code"], input={"code": 7}),  # fails: exit status 7
        Task.wasm(guests["hello"], network=True),  # refused: the policy has no network
        Task.wasm(guests["trap_unreachable"]),  # crashes
        Task.wasm(guests["hello"], env={"A": "1"}),
    ]


def _comparable(item: Result | BaseException) -> Any:
    if isinstance(item, BaseException):
        return type(item), item.args, {k: v for k, v in vars(item).items() if k != "__notes__"}
    return item.model_dump(exclude=_PER_RUN)


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def _worker_children() -> list[int]:
    """Our spawned workers still alive (multiprocessing's resource tracker is not one)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _workspaces_of(pid: int) -> list[Path]:
    root = Path(os.environ["WASMBOX_TMPDIR"])
    return list(root.glob(f"{PREFIX}{pid}-*"))


def _kill_when_busy(pool: ProcessPool, pid: int, timeout: float = 60.0) -> None:
    """SIGKILL worker `pid` as soon as it has a task running (its workspace exists)."""
    give_up = time.monotonic() + timeout
    while not _workspaces_of(pid):
        assert time.monotonic() < give_up, "the worker never started its task"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)


def test_results_equal_in_process_results_for_a_mixed_batch(
    guests: dict[str, Path], module_cache: Path, make_sandbox: Any
) -> None:
    tasks = _mixed_batch(guests)
    expected: list[Result | BaseException] = []
    with make_sandbox() as sb:
        for task in tasks:
            try:
                expected.append(sb.run(task))
            except SandboxError as exc:
                expected.append(exc)
    with _pool(module_cache) as pool:
        got = pool.map(tasks, chunksize=2, return_exceptions=True)
    assert [_comparable(g) for g in got] == [_comparable(e) for e in expected]
    statuses = [g.status if isinstance(g, Result) else type(g) for g in got]
    assert statuses == [Status.COMPLETED, Status.FAILED, PolicyViolation, Status.CRASHED,
                        Status.COMPLETED]
    assert got[0].files == expected[0].files  # type: ignore[union-attr]


def test_runs_in_worker_processes_are_counted_in_this_process_s_metrics(
    guests: dict[str, Path], module_cache: Path
) -> None:
    """An application exports this process's registry: runs made in worker processes are
    counted here, as `Sandbox.map`'s are."""
    from prometheus_client import REGISTRY

    def count(status: str) -> float:
        labels = {"tier": "wasm", "status": status}
        return REGISTRY.get_sample_value("wasmbox_runs_total", labels) or 0.0

    before = count("completed"), count("failed")
    tasks = [Task.wasm(guests["hello"])] * 3 + [Task.wasm(guests["exit_code"], input={"code": 3})]
    with _pool(module_cache) as pool:
        assert [r.status for r in pool.map(tasks)] == [Status.COMPLETED] * 3 + [Status.FAILED]
    assert (count("completed"), count("failed")) == (before[0] + 3, before[1] + 1)


def test_map_raises_the_first_refusal_with_its_fields_like_sandbox_map(
    guests: dict[str, Path], module_cache: Path, make_sandbox: Any
) -> None:
    tasks = _mixed_batch(guests)
    with make_sandbox() as sb, pytest.raises(PolicyViolation) as local:
        sb.map(tasks)
    with _pool(module_cache) as pool, pytest.raises(PolicyViolation) as remote:
        pool.map(tasks, chunksize=1)
    assert remote.value.rule == local.value.rule == "network.enabled"
    assert str(remote.value) == str(local.value)
    # The pool stays usable after a refusal.
    with _pool(module_cache, processes=1) as pool:
        assert [r.status for r in pool.map([Task.wasm(guests["hello"])])] == [Status.COMPLETED]


def test_no_worker_outlives_close(guests: dict[str, Path], module_cache: Path) -> None:
    pool = _pool(module_cache)
    pids = pool.pids
    assert len(pids) == 2 and _alive(pids) == pids
    assert all(r.ok for r in pool.map([Task.wasm(guests["hello"])] * 6))
    pool.close()
    pool.close()  # idempotent
    assert _alive(pids) == []
    assert _worker_children() == []


def test_a_killed_workers_tasks_are_rerun_and_nothing_is_left_behind(
    guests: dict[str, Path], module_cache: Path
) -> None:
    slow = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=1.0))
    hello = Task.wasm(guests["hello"])
    with _pool(module_cache, processes=1) as pool:
        [victim] = pool.pids
        killer = threading.Thread(target=_kill_when_busy, args=(pool, victim))
        killer.start()
        results = pool.map([slow, hello, hello], chunksize=3)
        killer.join()
        assert [r.status for r in results] == [Status.TIMEOUT, Status.COMPLETED,
                                               Status.COMPLETED]
        assert pool.pids and victim not in pool.pids
        assert _workspaces_of(victim) == []  # the dead worker's workspace was reclaimed
        pids = pool.pids
    assert _alive([victim, *pids]) == []


def test_a_task_whose_worker_dies_twice_gets_a_host_failure_and_the_rest_run(
    guests: dict[str, Path], module_cache: Path
) -> None:
    slow = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=5.0))
    hello = Task.wasm(guests["hello"])
    with _pool(module_cache, processes=1) as pool:
        first = pool.pids[0]

        def kill_twice() -> None:
            _kill_when_busy(pool, first)
            give_up = time.monotonic() + 60
            while not pool.pids or pool.pids[0] == first:  # the replacement worker
                assert time.monotonic() < give_up
                time.sleep(0.01)
            _kill_when_busy(pool, pool.pids[0])

        killer = threading.Thread(target=kill_twice)
        killer.start()
        results = pool.map([slow, hello], chunksize=2, return_exceptions=True)
        killer.join()
        assert isinstance(results[0], HostFailure)
        assert "SIGKILL" in str(results[0])
        assert isinstance(results[1], Result) and results[1].ok
        pids = pool.pids
    assert _alive(pids) == []
    assert _worker_children() == []


def test_keyboard_interrupt_during_map_stops_every_worker(
    guests: dict[str, Path], module_cache: Path
) -> None:
    slow = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=60.0))
    pool = _pool(module_cache)
    pids = pool.pids

    def interrupt() -> None:
        give_up = time.monotonic() + 60
        while not all(_workspaces_of(pid) for pid in pids):
            assert time.monotonic() < give_up
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        pool.map([slow, slow], chunksize=1)
    interrupter.join()
    assert pool.closed
    assert _alive(pids) == []
    assert _worker_children() == []
    assert all(_workspaces_of(pid) == [] for pid in pids)


class _FailsInTheWorker:
    """A tier factory that pickles here but raises when a worker unpickles it."""

    def __call__(self) -> WasmTier:
        return WasmTier()

    def __reduce__(self) -> tuple[Any, ...]:
        return (operator.truediv, (1, 0))


def test_a_worker_that_cannot_start_is_a_host_failure_and_leaves_no_process() -> None:
    with pytest.raises(HostFailure, match="failed to start: ZeroDivisionError"):
        ProcessPool(processes=2, tiers={TierName.WASM: _FailsInTheWorker()})
    assert _worker_children() == []


def test_tier_factories_that_cannot_pickle_are_refused_up_front() -> None:
    from wasmbox.errors import ConfigError

    with pytest.raises(ConfigError, match="pickle"):
        ProcessPool(processes=1, tiers={TierName.WASM: lambda: WasmTier()})


def test_a_pool_after_close_refuses_work(guests: dict[str, Path], module_cache: Path) -> None:
    from wasmbox.errors import SandboxClosed

    pool = _pool(module_cache, processes=1)
    pool.close()
    with pytest.raises(SandboxClosed):
        pool.map([Task.wasm(guests["hello"])])



# --- what a worker sends back is hostile input ---------------------------------------------
# A worker runs guest code in its own address space; if a guest ever took it over, the reply
# pipe is its way into the parent. The parent must parse, not unpickle, and bound it.


class _Planted:
    """Unpickling this creates a file: proof that a reply was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _pipe_worker() -> tuple[Any, Any]:
    import multiprocessing

    from wasmbox._procpool_worker import Worker

    parent, child = multiprocessing.Pipe()
    return Worker(None, parent), child  # type: ignore[arg-type]  # only the pipe is used


def _frame(replies: list[tuple[str, bytes, dict[str, bytes]]]) -> bytes:
    from wasmbox._procpool_wire import encode_frame

    return encode_frame(replies)


def test_a_worker_reply_is_parsed_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    worker, child = _pipe_worker()
    child.send([_Planted(marker)])  # what a hijacked worker would send through pickle
    assert worker.receive(1, 1 << 20) is None
    assert not marker.exists()


def test_a_reply_larger_than_the_policy_allows_is_refused() -> None:
    from wasmbox._procpool_wire import encode_result

    result = Result(task_id="t", run_id="r", tier=TierName.WASM, status=Status.COMPLETED,
                    stdout="x" * 5000)
    worker, child = _pipe_worker()
    child.send_bytes(_frame([encode_result(result)]))
    assert worker.receive(1, 4096) is None  # the pool then stops that worker
    worker, child = _pipe_worker()
    child.send_bytes(_frame([encode_result(result)]))
    assert worker.receive(1, 1 << 20) == [result]


@pytest.mark.parametrize("frame", [
    b"",
    b"\xff\xff\xff\xff{}",
    b"\x00\x00\x00\x02[]",
    b'\x00\x00\x00\x0b[["r",9,[]]]',  # a body length past the end
    b'\x00\x00\x00\x0c[["e",2,[]]]{}',  # an error naming no class
    b'\x00\x00\x00\x0c[["x",2,[]]]{}',  # an unknown kind
], ids=["empty", "huge-header", "no-replies", "overrun", "no-class", "unknown-kind"])
def test_a_malformed_frame_is_treated_like_a_dead_worker(frame: bytes) -> None:
    worker, child = _pipe_worker()
    child.send_bytes(frame)
    assert worker.receive(1, 1 << 20) is None


@pytest.mark.parametrize("name", ["annotations", "__builtins__", "__loader__", "Path"])
def test_an_error_reply_rebuilds_only_wasmbox_errors(name: str) -> None:
    import json

    body = json.dumps({"type": name, "args": ["x"], "fields": {}}).encode()
    worker, child = _pipe_worker()
    child.send_bytes(_frame([("e", body, {})]))
    assert worker.receive(1, 1 << 20) is None


def test_every_public_error_travels_with_its_class_and_fields() -> None:
    import wasmbox.errors as errors
    from wasmbox._procpool_wire import encode_error

    samples: list[Exception] = [
        errors.SandboxError("root"), errors.ConfigError("bad config"),
        errors.PolicyViolation("network.enabled", "no network"),
        errors.InputRejected("not JSON"), errors.ModuleRejected("not wasm"),
        errors.TierUnavailable("vm", "no qemu"), errors.SandboxClosed("closed"),
        errors.HostFailure("disk full"), ValueError("a bug"),
    ]
    worker, child = _pipe_worker()
    child.send_bytes(_frame([encode_error(exc) for exc in samples]))
    back = worker.receive(len(samples), 1 << 20)
    assert back is not None
    for sent, got in zip(samples[:-1], back, strict=False):
        assert type(got) is type(sent) and got.args == sent.args and str(got) == str(sent)
        assert {k: v for k, v in vars(got).items() if k != "__notes__"} == vars(sent)
    assert type(back[-1]) is HostFailure and "ValueError: a bug" in str(back[-1])


def test_a_result_with_text_json_cannot_carry_still_comes_back_whole() -> None:
    from wasmbox._procpool_wire import encode_result

    result = Result(task_id="t", run_id="r", tier=TierName.WASM, status=Status.COMPLETED,
                    output={"s": "\ud800"}, files={"b.bin": b"\xff\x00"})
    worker, child = _pipe_worker()
    child.send_bytes(_frame([encode_result(result)]))
    assert worker.receive(1, 1 << 20) == [result]


def test_sandbox_map_with_processes_uses_and_then_closes_a_pool(
    module_cache: Path, guests: dict[str, Path]
) -> None:
    from wasmbox import Sandbox

    tiers = {TierName.WASM: functools.partial(WasmTier, module_cache)}
    batch = _mixed_batch(guests)
    with Sandbox(Policy(), tiers=tiers) as sb:
        local = sb.map(batch, return_exceptions=True)
        remote = sb.map(batch, return_exceptions=True, processes=2)
        assert [_comparable(x) for x in remote] == [_comparable(x) for x in local]
        with pytest.raises(PolicyViolation):
            sb.map(batch, processes=2)  # the same pool, the refusal raised as in-process
        pids = list(sb._pools[2].pids)
        assert len(sb._pools) == 1 and _alive(pids)
    assert not _alive(pids)  # closing the sandbox closed its pool
