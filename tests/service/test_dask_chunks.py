"""Batches travel in chunks: fewer Dask futures than tasks, run in each worker's one warm
sandbox (closed on the worker's teardown), and a chunk's answer is checked.

A worker's answer for a chunk is data from another process: one that does not give exactly one
entry per task, answers for another task, or reports a non-finite duration must cost only the
tasks of that chunk (a typed `HostFailure` each) and never break the batch or its sizing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from tests.service._support import local_cluster
from wasmbox import Result, Status, Task
from wasmbox._dask_batch import _Batch, _Costs
from wasmbox.distributed import (
    KEY_PREFIX,
    PLUGIN_NAME,
    DistributedSandbox,
    _decode,
    _portable,
    _Shipped,
)
from wasmbox.errors import HostFailure
from wasmbox.models import TierName


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with local_cluster() as cluster, Client(cluster) as dask_client:
        yield dask_client


def futures_run(client: Client) -> set[str]:
    """Every wasmbox key the scheduler has sent to a worker so far."""
    log = client.run_on_scheduler(lambda dask_scheduler: [
        (str(entry[0]), entry[2]) for entry in dask_scheduler.transition_log])
    return {key for key, finish in log if finish == "processing" and key.startswith(KEY_PREFIX)}


def test_a_batch_of_small_tasks_travels_in_far_fewer_futures_than_tasks(
    client: Client, guests: dict[str, Path]
) -> None:
    sandbox = DistributedSandbox(client)
    before = futures_run(client)
    tasks = [Task.wasm(guests["json_transform"], input={"xs": [i]}) for i in range(300)]
    results = sandbox.map([*tasks, tasks[0]])  # a repeated id runs once
    used = futures_run(client) - before
    assert [r.output["sum"] for r in results] == [*range(300), 0]  # type: ignore[index]
    assert results[0].run_id == results[-1].run_id
    assert any("chunk-" in key for key in used)
    assert len(used) < len(tasks) // 4, len(used)


def test_tasks_of_one_module_share_its_bytes_and_a_path_is_read_once(
    guests: dict[str, Path]
) -> None:
    modules: dict[Path | bytes, bytes] = {}
    by_path = [_portable(Task.wasm(guests["hello"]), modules) for _ in range(3)]
    data = guests["hello"].read_bytes()
    by_bytes = [_portable(Task.wasm(bytes(data)), modules) for _ in range(2)]
    shared = {id(t.module_bytes) for t in by_path + by_bytes}
    assert len(shared) == 1 and all(t.module is None for t in by_path)


def _shipped(task_id: str) -> _Shipped:
    return _Shipped.of(Result(task_id=task_id, run_id="r", tier=TierName.WASM,
                              status=Status.COMPLETED, output={"ok": True}))


ELSEWHERE = "1-another-process"


def test_a_well_formed_answer_is_decoded_per_task() -> None:
    decoded = _decode("k", ([_shipped("a"), _shipped("b")], 0.25, ELSEWHERE), ["a", "b"])
    assert not isinstance(decoded, HostFailure)
    settled, busy, elsewhere = decoded
    assert [r.task_id for r in settled if isinstance(r, Result)] == ["a", "b"]
    assert busy == 0.25 and elsewhere


@pytest.mark.parametrize("answer", [
    ([], 0.1, ELSEWHERE),  # too few entries: a task would be lost
    ([_shipped("a"), _shipped("b"), _shipped("c")], 0.1, ELSEWHERE),  # too many
    [_shipped("a"), _shipped("b")],  # not the (entries, seconds, origin) triple
    ([_shipped("a"), _shipped("b")], 0.1),
    ([_shipped("a"), _shipped("b")], 0.1, 7),  # an origin that is not a string
    ("not a list", 0.1, ELSEWHERE),
    None,
])
def test_an_answer_that_does_not_fit_its_chunk_fails_each_of_its_tasks(answer: object) -> None:
    decoded = _decode("k", answer, ["a", "b"])
    assert isinstance(decoded, HostFailure)


def test_an_answer_for_another_task_fails_only_that_task() -> None:
    decoded = _decode("k", ([_shipped("a"), _shipped("someone-else")], 0.1, ELSEWHERE),
                      ["a", "b"])
    assert not isinstance(decoded, HostFailure)
    first, second = decoded[0]
    assert isinstance(first, Result) and first.task_id == "a"
    assert isinstance(second, HostFailure) and "someone-else" in str(second)


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
def test_a_non_finite_or_negative_duration_does_not_steer_chunk_sizes(seconds: float) -> None:
    decoded = _decode("k", ([_shipped("a")], seconds, ELSEWHERE), ["a"])
    assert not isinstance(decoded, HostFailure)
    assert decoded[1] == 0.0


def _sandbox_ids(dask_worker: Any = None) -> list[int]:
    plugin = dask_worker.plugins[PLUGIN_NAME]
    dask_worker.wasmbox_seen = list(plugin._sandboxes.values())  # kept to look at after teardown
    return [id(sandbox) for sandbox in dask_worker.wasmbox_seen]


def _seen_closed(dask_worker: Any = None) -> list[bool]:
    return [sandbox.closed for sandbox in dask_worker.wasmbox_seen]


def test_each_worker_keeps_one_warm_sandbox_and_closes_it_on_teardown(
    guests: dict[str, Path]
) -> None:
    with local_cluster(1) as cluster, Client(cluster) as own:
        sandbox = DistributedSandbox(own)
        hello = [Task.wasm(guests["hello"]) for _ in range(40)]
        assert all(r.ok for r in sandbox.map(hello))
        first = own.run(_sandbox_ids)
        assert all(r.ok for r in sandbox.map([Task.wasm(guests["hello"]) for _ in range(40)]))
        assert own.run(_sandbox_ids) == first  # the same sandbox, made once per policy
        assert [len(ids) for ids in first.values()] == [1]
        own.unregister_worker_plugin(PLUGIN_NAME)  # the worker tears the plugin down
        assert list(own.run(_seen_closed).values()) == [[True]]


def _diagnostics(dask_worker: Any = None) -> dict[str, Any]:
    import dask

    return {"profiler": "profile" in dask_worker.periodic_callbacks,
            "tick_ms": dask_worker.periodic_callbacks["tick"].callback_time,
            "monitor_ms": dask_worker.periodic_callbacks["monitor"].callback_time,
            "spawn": dask.config.get("distributed.worker.multiprocessing-method")}


def test_workers_made_under_cluster_config_run_without_the_sampling_profiler(
    client: Client
) -> None:
    # Their CPU comes out of the cores the tasks run on: a sample every 10 ms, a tick every
    # 20 ms and psutil every 500 ms cost a worker's event loop several % of a core.
    for seen in client.run(_diagnostics).values():
        assert seen == {"profiler": False, "tick_ms": 1000, "monitor_ms": 2000,
                        "spawn": "spawn"}


class _TwoThreads:
    """Stands in for a `DistributedSandbox` whose cluster has two worker threads."""

    def __init__(self) -> None:
        self._costs = _Costs()

    def _threads(self) -> int:
        return 2


@pytest.mark.parametrize(("per_task_s", "left", "size"), [
    (0.001, 20, 10),  # 1 ms tasks: at least MIN_CHUNK_S (10 ms) of them, not a quarter of 20
    (0.001, 4, 4),  # never more than are left
    (0.05, 3, 1),  # a slow task is a chunk of its own at the end
    (0.01, 100, 25),  # a quarter of the batch (2 threads x CHUNKS_PER_BATCH_THREAD)
    (0.01, 1000, 100),  # a long batch: chunks of at most CHUNK_TARGET_S (1 s) of work
])
def test_a_chunk_carries_at_least_min_chunk_s_of_work_while_that_many_are_left(
    guests: dict[str, Path], per_task_s: float, left: int, size: int
) -> None:
    batch = _Batch(_TwoThreads(), [Task.wasm(guests["hello"]) for _ in range(left)], {})  # type: ignore[arg-type]
    batch.per_task_s = per_task_s
    assert min(batch._size(), left) == size


def _chunk_sizes(batch: _Batch) -> list[int]:
    """The sizes `batch` cuts its queue into, as `_fill` would take them."""
    sizes = []
    while batch.queue:
        size = min(batch._size(), len(batch.queue))
        for _ in range(size):
            batch.queue.popleft()
        sizes.append(size)
    return sizes


def test_a_batch_is_cut_into_a_few_equal_chunks_per_worker_thread(
    guests: dict[str, Path]
) -> None:
    # Cutting a share of what is left each time ended 60 CPU-bound tasks in ~14 chunks, the
    # last ones a task each; every chunk costs the client and scheduler ~10 ms of CPU.
    batch = _Batch(_TwoThreads(), [Task.wasm(guests["hello"]) for _ in range(60)], {})  # type: ignore[arg-type]
    batch.per_task_s = 0.025
    assert _chunk_sizes(batch) == [15] * 4  # 2 threads x CHUNKS_PER_BATCH_THREAD (2)


def test_a_change_in_worker_threads_plans_the_rest_of_the_batch_again(
    guests: dict[str, Path]
) -> None:
    batch = _Batch(_TwoThreads(), [Task.wasm(guests["hello"]) for _ in range(64)], {})  # type: ignore[arg-type]
    batch.per_task_s = 0.025
    assert batch._size() == 16
    for _ in range(32):
        batch.queue.popleft()
    batch.threads = 4  # two more workers joined: the 32 left spread over 8 chunks
    assert _chunk_sizes(batch) == [4] * 8


def test_a_batch_longer_than_the_target_is_cut_into_equal_chunks_per_thread(
    guests: dict[str, Path]
) -> None:
    # Chunks of the target size ended in an odd short chunk (ten of 28 and one of 20 at a
    # 500 ms target): one worker ran it while the other sat idle.
    batch = _Batch(_TwoThreads(), [Task.wasm(guests["hello"]) for _ in range(300)], {})  # type: ignore[arg-type]
    batch.per_task_s = 0.018  # 5.4 s of work: 3 chunks a thread, each under 1 s
    assert _chunk_sizes(batch) == [50] * 6


def test_a_slow_first_estimate_is_planned_again_from_the_latest_cost(
    guests: dict[str, Path]
) -> None:
    # A slow first estimate (a module's first compile) must not keep a long batch in tiny
    # chunks, nor small moves of the estimate break the equal plan.
    batch = _Batch(_TwoThreads(), [Task.wasm(guests["hello"]) for _ in range(4000)], {})  # type: ignore[arg-type]
    batch.per_task_s = 0.2
    assert batch._size() == 5  # CHUNK_TARGET_S of 200 ms tasks
    batch.per_task_s = 0.1
    assert batch._size() == 5  # within REPLAN_FACTOR: the same plan
    batch.per_task_s = 0.4
    assert batch._size() == 5  # nor when it rises (a loaded machine): the same plan
    batch.per_task_s = 0.001
    assert batch._size() == 250  # 16 equal chunks of at most MAX_CHUNK


def _first_chunk(client: Client, before: int) -> str:
    """The key of the first wasmbox chunk sent to a worker after `before` log entries."""
    log = client.run_on_scheduler(lambda dask_scheduler: [
        str(entry[0]) for entry in list(dask_scheduler.transition_log)[before:]
        if entry[2] == "processing"])
    return next(key for key in log if key.startswith(KEY_PREFIX))


def _log_length(client: Client) -> int:
    return int(client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.transition_log)))


def test_a_batch_of_a_kind_seen_before_starts_with_sized_chunks(
    client: Client, guests: dict[str, Path]
) -> None:
    # One round trip a task to learn what a task costs is paid once per kind of task, not
    # once per batch: each single-task chunk costs the shared cores a chunk's overhead.
    sandbox = DistributedSandbox(client)
    hello = [Task.wasm(guests["hello"]) for _ in range(20)]
    before = _log_length(client)
    assert all(r.ok for r in sandbox.map(hello))
    assert "chunk-" not in _first_chunk(client, before)  # new: one task first
    before = _log_length(client)
    assert all(r.ok for r in sandbox.map([Task.wasm(guests["hello"]) for _ in range(20)]))
    assert "chunk-" in _first_chunk(client, before)  # known: sized from the start
    before = _log_length(client)
    other = [Task.wasm(guests["hello"], args=("other",)) for _ in range(20)]
    assert all(r.ok for r in sandbox.map(other))
    assert "chunk-" not in _first_chunk(client, before)  # other arguments: another kind


def test_costs_remember_a_bounded_number_of_kinds() -> None:
    costs = _Costs()
    for kind in range(_Costs.LIMIT + 10):
        costs.put(kind, kind / 1000)
    assert costs.get(0) is None and costs.get(_Costs.LIMIT + 9) == (_Costs.LIMIT + 9) / 1000
    costs.put(10, 1.0)  # refreshed: the newest again
    assert costs.get(10) == 1.0
