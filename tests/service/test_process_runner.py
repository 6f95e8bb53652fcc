"""ProcessRunner: the service's tasks in spawned runner processes, as ThreadRunner runs them.

Runner processes are real processes running real sandboxes, killed with real signals. Where
a test needs a task to be running, it watches for the runner's workspace directory (named
for its pid) to appear.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, auth, config_data, wait_final
from wasmbox import Policy, Sandbox, Task
from wasmbox._procpool_worker import ModuleMemo, RunOrder
from wasmbox.errors import ConfigError, HostFailure, PolicyViolation, SandboxClosed
from wasmbox.models import Resources, Result, Status
from wasmbox.service import ServiceConfig, create_app
from wasmbox.service._runners import ProcessRunner, ThreadRunner, make_runner
from wasmbox.service.config import RunnerKind
from wasmbox.service.store import TaskStore
from wasmbox.workspace import PREFIX

pytestmark = pytest.mark.timeout(180)  # a hung runner fails the test instead of the run

POLICIES = {"default": Policy(), "strict": Policy(name="strict", allowed_tiers=["wasm"])}
_PER_RUN = {"run_id", "metrics"}  # what differs between two runs of one task by design


@pytest.fixture(scope="module")
def runner() -> Iterator[ProcessRunner]:
    with ProcessRunner(POLICIES, processes=2) as started:
        yield started


def _same(result: Result) -> dict[str, Any]:
    return result.model_dump(exclude=_PER_RUN)


def _outcome(run: Callable[[], Result]) -> Any:
    try:
        return _same(run())
    except Exception as exc:  # the same class, message and fields from either runner
        return type(exc), exc.args, {k: v for k, v in vars(exc).items() if k != "__notes__"}


def _workspaces_of(pid: int) -> list[Path]:
    return list(Path(os.environ["WASMBOX_TMPDIR"]).glob(f"{PREFIX}{pid}-*"))


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def _runner_processes() -> set[int]:
    """The pids of this process's spawned children (runner processes, here)."""
    found = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # one that just left
            if "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
    return found


def _on_a_thread(runner: ProcessRunner, task: Task) -> tuple[threading.Thread, list[Any]]:
    """Run `task` on a started thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(runner.run("default", task))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _start(runner: ProcessRunner, task: Task) -> tuple[threading.Thread, list[Any], int]:
    """Run `task` on a thread; return once a runner process has it running (and its pid)."""
    before = {pid: set(_workspaces_of(pid)) for pid in runner.pids}
    thread, out = _on_a_thread(runner, task)
    give_up = time.monotonic() + 60
    while True:
        busy = [pid for pid, seen in before.items() if set(_workspaces_of(pid)) - seen]
        if busy:
            return thread, out, busy[0]
        assert time.monotonic() < give_up, "the task never started"
        time.sleep(0.01)


def test_results_equal_thread_runner_results(guests: dict[str, Path],
                                             runner: ProcessRunner) -> None:
    tasks = [
        ("default", Task.wasm(guests["hello"])),  # ok, with an output file
        ("default", Task.wasm(guests["json_transform"], input={"xs": [1, 2, 3]})),  # output
        ("default", Task.wasm(guests["exit_code"], input={"code": 7})),  # failed
        ("default", Task.wasm(guests["trap_unreachable"])),  # crashed
        ("default", Task.wasm(guests["infinite_loop"],  # timed out
                              resources=Resources(timeout=0.5))),
        ("strict", Task.wasm(guests["hello"], network=True)),  # refused: PolicyViolation
    ]
    with ThreadRunner(POLICIES) as threads:
        expected = [_outcome(lambda p=p, t=t: threads.run(p, t)) for p, t in tasks]
    got = [_outcome(lambda p=p, t=t: runner.run(p, t)) for p, t in tasks]
    assert got == expected
    statuses = [e["status"] if isinstance(e, dict) else e[0] for e in got]
    assert statuses == [Status.COMPLETED, Status.COMPLETED, Status.FAILED, Status.CRASHED,
                        Status.TIMEOUT, PolicyViolation]
    assert "result.json" in got[0]["files"]


def test_a_killed_runner_fails_its_task_and_the_next_task_runs_on_a_fresh_one(
    guests: dict[str, Path], runner: ProcessRunner
) -> None:
    spin = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=30))
    thread, out, victim = _start(runner, spin)
    os.kill(victim, signal.SIGKILL)
    thread.join(60)
    assert isinstance(out[0], HostFailure)
    assert "killed by SIGKILL" in str(out[0])
    assert victim not in runner.pids and len(runner.pids) == 2
    assert _alive([victim]) == []
    assert _workspaces_of(victim) == []  # the dead runner's workspace was reclaimed
    results = [runner.run("default", Task.wasm(guests["hello"])) for _ in range(4)]
    assert all(r.ok for r in results)


def _in_flight(runner: ProcessRunner, task: Task) -> tuple[threading.Thread, list[Any]]:
    """Run `task` on a thread; return once the runner has sent it to a process."""
    thread, out = _on_a_thread(runner, task)
    give_up = time.monotonic() + 60
    while task.id not in runner._running:
        assert time.monotonic() < give_up, "the task was never sent"
        time.sleep(0.01)
    return thread, out


def _sleepers(guests: dict[str, Path], count: int) -> list[Task]:
    """Tasks that sleep far longer than a test waits (until cancelled)."""
    return [Task.wasm(guests["sleep_long"], args=["rel", "20000"], resources=Resources(timeout=30))
            for _ in range(count)]


def test_a_runner_process_holds_its_next_task_and_a_cancel_reaches_it_before_it_starts(
    guests: dict[str, Path]
) -> None:
    with ProcessRunner(POLICIES, processes=1) as runner:
        first, second = _sleepers(guests, 2)
        thread_1, out_1, _ = _start(runner, first)
        thread_2, out_2 = _in_flight(runner, second)
        assert runner.cancel(second.id)  # queued behind the first, in the process's pipe
        assert out_1 == []  # the first still runs: the second waited there, not here
        assert runner.cancel(first.id)
        thread_1.join(60)
        thread_2.join(60)
    assert [type(o) for o in out_1 + out_2] == [Result, Result], (out_1, out_2)
    assert out_1[0].status is Status.CANCELLED
    assert out_2[0].status is Status.CANCELLED  # it started cancelled: no 20 s sleep
    assert out_2[0].metrics.wall_s < 15


def test_a_killed_runner_fails_only_its_running_task_and_its_queued_task_runs_elsewhere(
    guests: dict[str, Path]
) -> None:
    with ProcessRunner(POLICIES, processes=1) as runner:
        spin = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=30))
        thread_1, out_1, victim = _start(runner, spin)
        thread_2, out_2 = _in_flight(runner, Task.wasm(guests["hello"]))
        os.kill(victim, signal.SIGKILL)
        thread_1.join(60)
        thread_2.join(60)
        assert isinstance(out_1[0], HostFailure) and "killed by SIGKILL" in str(out_1[0])
        assert isinstance(out_2[0], Result) and out_2[0].ok, out_2  # on the fresh process
        assert victim not in runner.pids and len(runner.pids) == 1


def test_a_task_waiting_behind_a_long_one_moves_to_a_process_gone_idle(
    guests: dict[str, Path]
) -> None:
    with ProcessRunner(POLICIES, processes=2) as runner:
        longs = _sleepers(guests, 2)
        started = [_start(runner, task) for task in longs]  # one on each process
        short = Task.wasm(guests["hello"])
        thread, out = _in_flight(runner, short)  # queued behind one of the long ones
        ahead = runner._running[short.id].lane.slots[0].task_id  # type: ignore[union-attr]
        behind = [task.id for task in longs].index(ahead)
        assert runner.cancel(longs[1 - behind].id)  # that process goes idle: it moves there
        thread.join(60)
        assert isinstance(out[0], Result) and out[0].ok, out
        assert started[behind][1] == []  # it did not wait for the task it was queued behind
        assert runner.cancel(ahead)
        for long_thread, _, _ in started:
            long_thread.join(60)
        # The process it left skipped it, and nobody took that answer for their result.
        outs = [o for _, long_out, _ in started for o in long_out]
        assert [o.status for o in outs] == [Status.CANCELLED] * 2, outs
        results = [runner.run("default", Task.wasm(guests["hello"])) for _ in range(4)]
        assert all(r.ok for r in results)
        assert len(runner.pids) == 2


def test_cancels_and_drops_by_place_reach_only_a_running_or_a_not_started_task() -> None:
    order = RunOrder()
    order.cancel(2)  # the second task is still in the pipe
    order.cancel("2")  # not a place: ignored
    first = order.start()
    order.finish()
    order.cancel(1)  # answered already: ignored
    second = order.start()
    order.finish()
    third = order.start()
    order.cancel(3)  # running
    assert order.drop(5) and not order.drop(3)  # not started yet; started already
    order.finish()
    assert first and second and third
    assert (first._thrown, second._thrown, third._thrown) == (False, True, True)
    fourth = order.start()
    assert fourth is not None and not fourth._thrown and not order._early
    order.finish()
    assert order.start() is None  # the fifth was dropped


def test_cancel_stops_the_running_task_and_keeps_its_runner(
    guests: dict[str, Path], runner: ProcessRunner
) -> None:
    task = Task.wasm(guests["infinite_loop"], resources=Resources(timeout=20))
    thread, out, pid = _start(runner, task)
    assert runner.cancel(task.id)
    thread.join(60)
    assert isinstance(out[0], Result), out
    assert out[0].status is Status.CANCELLED
    assert out[0].metrics.wall_s < 15
    assert pid in runner.pids  # stopped by its Sandbox, not by killing the process
    assert not runner.cancel(task.id)  # no longer running


def test_close_stops_every_runner_process(guests: dict[str, Path]) -> None:
    runner = ProcessRunner(POLICIES, processes=2)
    pids = runner.pids
    assert len(pids) == 2 and _alive(pids) == pids
    assert runner.run("default", Task.wasm(guests["hello"])).ok
    runner.close()
    assert _alive(pids) == []


def test_abort_stops_the_running_task_and_every_runner_process(guests: dict[str, Path]) -> None:
    runner = ProcessRunner(POLICIES, processes=2)
    pids = runner.pids
    thread, out, pid = _start(runner, Task.wasm(guests["sleep_long"], args=["rel", "20000"],
                                                resources=Resources(timeout=30)))
    assert runner.abort()
    thread.join(60)
    assert isinstance(out[0], HostFailure), out  # not its CANCELLED result: no result at all
    assert runner.closed and _alive(pids) == []
    assert _workspaces_of(pid) == []  # its sandbox cleaned up (or the workspace was reclaimed)
    with pytest.raises(SandboxClosed):
        runner.run("default", Task.wasm(guests["hello"]))


def test_a_task_cancelled_before_an_abort_keeps_its_cancelled_result(
    guests: dict[str, Path]
) -> None:
    runner = ProcessRunner(POLICIES, processes=1)
    task = Task.wasm(guests["sleep_long"], args=["rel", "20000"], resources=Resources(timeout=30))
    thread, out, _ = _start(runner, task)
    assert runner.cancel(task.id)  # the client's cancel: the task ends CANCELLED ...
    assert runner.abort()  # ... and the shutdown that follows does not take that away
    thread.join(60)
    assert isinstance(out[0], Result), out
    assert out[0].status is Status.CANCELLED


def test_the_service_setting_selects_the_runner(tmp_path: Path) -> None:
    config = ServiceConfig.from_dict({"service": {"runner": "processes",
                                                  "runner_processes": 1}})
    assert config.service.runner is RunnerKind.PROCESSES
    with make_runner(config) as chosen:  # type: ignore[attr-defined]
        assert isinstance(chosen, ProcessRunner) and len(chosen.pids) == 1
    threads = ServiceConfig.from_dict({"service": {"runner": "threads"}})
    with make_runner(threads) as chosen:  # type: ignore[attr-defined]
        assert isinstance(chosen, ThreadRunner)
    assert ServiceConfig().service.runner is RunnerKind.PROCESSES  # the default


def test_a_sandbox_factory_needs_the_thread_runner() -> None:
    with pytest.raises(ConfigError, match="sandbox_factory"):
        make_runner(ServiceConfig(), sandbox_factory=lambda policy: Sandbox(policy))


def test_a_shutdown_past_its_grace_stops_the_runners_and_the_task_runs_again(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str], tmp_path: Path
) -> None:
    config = config_data(tmp_path / "tasks.db", runner="processes", runner_processes=1,
                         shutdown_grace=0.5)
    others = _runner_processes()
    client = TestClient(create_app(ServiceConfig.from_dict(config)))
    client.__enter__()
    runners = _runner_processes() - others
    assert len(runners) == 1
    task_id = client.post("/v1/tasks", json={
        "kind": "wasm", "module_b64": wasm_b64["sleep_long"], "args": ["rel", "3000"],
        "resources": {"timeout": 20}}, headers=auth(ALICE)).json()["id"]
    for _ in range(500):
        if client.get(f"/v1/tasks/{task_id}", headers=auth(ALICE)).json()["state"] == "running":
            break
        time.sleep(0.01)
    time.sleep(0.3)  # the running state is journaled just before the runner starts it
    client.__exit__(None, None, None)  # the service shuts down: 0.5 s of grace for a 3 s task
    # The runner process is gone at once, not when its task would have ended.
    assert _alive(list(runners)) == []
    with TaskStore(tmp_path / "tasks.db") as journal:
        record = journal.get(task_id)
    assert record is not None
    assert (record.state, record.attempts, record.result) == ("running", 1, None)

    view = wait_final(make_client(runner="processes", runner_processes=1), task_id)
    assert view["result"]["status"] == "completed"
    assert "elapsed_ms=" in view["result"]["stdout"]  # it slept its 3 s in full, this time
    assert view["attempts"] == 2


def test_the_service_runs_and_cancels_tasks_in_runner_processes(
    make_client: Callable[..., TestClient], wasm_b64: dict[str, str]
) -> None:
    client = make_client(runner="processes", runner_processes=1)
    done = client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["hello"]},
                       headers=auth(ALICE)).json()
    spin = client.post("/v1/tasks", json={"kind": "wasm", "module_b64": wasm_b64["infinite_loop"],
                                          "resources": {"timeout": 20}},
                       headers=auth(ALICE)).json()
    assert wait_final(client, done["id"])["result"]["status"] == "completed"
    url = f"/v1/tasks/{spin['id']}"
    for _ in range(500):
        if client.get(url, headers=auth(ALICE)).json()["state"] == "running":
            break
        time.sleep(0.01)
    time.sleep(0.3)  # the running state is journaled just before the runner starts it
    assert client.post(f"{url}/cancel", headers=auth(ALICE)).json()["cancel_requested"]
    final = wait_final(client, spin["id"])
    assert final["result"]["status"] == "cancelled"
    assert final["result"]["metrics"]["wall_s"] < 15  # stopped, not run out to its 20 s


def test_a_module_travels_once_and_every_task_gets_its_own_module(
    guests: dict[str, Path], runner: ProcessRunner
) -> None:
    parent, child = ModuleMemo(), ModuleMemo()
    names = ["hello", "exit_code", "json_transform", "echo_env", "wordcount", "cat"]
    modules = {name: guests[name].read_bytes() for name in names}  # more than the memo holds
    sent = []
    for name in [*names, *names[::-1], "hello", "hello"]:
        task = Task.wasm(modules[name])
        travels, key = parent.strip(task)
        sent.append(travels.module_bytes is not None)
        assert child.restore(pickle.loads(pickle.dumps(travels)), key) == task
    # Without their bytes: the last SIZE modules on the way back, and the repeats.
    assert sent == [True] * 6 + [False] * ModuleMemo.SIZE + [True, True, False, False]
    # Through a runner process: the right module runs each time, whatever came before.
    order = ["hello", "exit_code", "hello", *names, "hello"]
    tasks = [Task.wasm(modules[name], input={"code": 3, "xs": [1]}) for name in order]
    with ThreadRunner(POLICIES) as threads:
        expected = [_outcome(lambda t=t: threads.run("default", t)) for t in tasks]
    assert [_outcome(lambda t=t: runner.run("default", t)) for t in tasks] == expected
    assert len({e["exit_code"] for e in expected}) > 1  # the modules differ in what they do


def test_module_memos_stay_in_step_when_a_known_module_is_reused() -> None:
    """A module re-sent without its bytes is as recent on the process's side as on the
    parent's: both memos evict the same module next, so a stripped task is always restorable."""
    parent, child = ModuleMemo(), ModuleMemo()
    modules = {name: bytes([i]) * 16 for i, name in enumerate("abcdef")}
    for name in "abcdaeafa":  # "a" reused without its bytes, then others push entries out
        task = Task.wasm(modules[name])
        travels, key = parent.strip(task)
        assert child.restore(travels, key) == task, name


def test_runs_in_runner_processes_are_counted_in_this_process_s_metrics(
    guests: dict[str, Path], runner: ProcessRunner
) -> None:
    """The service's /metrics exports this process's registry: a run made in a runner
    process is counted here, as a thread runner's is."""
    from prometheus_client import REGISTRY

    labels = {"tier": "wasm", "status": "completed"}

    def completed() -> float:
        return REGISTRY.get_sample_value("wasmbox_runs_total", labels) or 0.0

    before = completed()
    assert runner.run("default", Task.wasm(guests["hello"])).ok
    assert completed() == before + 1
