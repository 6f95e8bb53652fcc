"""Dask as deployed across hosts, on one machine: scheduler and workers as separate processes.

Every process listens on 127.0.0.1 only. Workers are SIGKILLed mid-run: a batch loses no task
and runs none twice beyond the documented retry (a chunk whose worker died runs once more
elsewhere), and a batch whose every worker vanished ends in bounded time with a typed failure
per unfinished task instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from wasmbox import Resources, Result, Status, Task
from wasmbox.distributed import KEY_PREFIX, DistributedSandbox, cluster_config

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD = 90  # seconds; a bound on the test itself, never a timing assertion


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] = "spawn"  # no fork after wasmtime
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
    # The scheduler's transition log is what the test counts runs from: keep all of it.
    env["DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH"] = "1000000"
    return env


class Processes:
    """The scheduler and worker processes this test started; each killed by its own pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=_environment(),
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def scheduler(self) -> str:
        """Start ``dask scheduler`` on a free loopback port; its address."""
        address_file = self.log_dir / "scheduler.json"
        proc = self.spawn("scheduler", [
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
            "--no-dashboard", "--scheduler-file", str(address_file)])
        deadline = time.monotonic() + HANG_GUARD
        while not address_file.exists() or not address_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(self.logs("scheduler did not start"))
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole, but not atomically
        address: str = json.loads(address_file.read_text())["address"]
        return address

    def worker(self, address: str, name: str, nanny: bool) -> subprocess.Popen[bytes]:
        """Start ``dask worker`` with one thread (with or without its nanny)."""
        argv = ["distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                "--nthreads", "1", "--name", name, "--no-dashboard"]
        return self.spawn(name, [*argv, "--nanny" if nanny else "--no-nanny"])

    def logs(self, why: str) -> str:
        text = [why]
        for log in sorted(self.log_dir.glob("*.log")):
            text.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(text)

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the nanny's child too
            proc.wait(30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def wait_workers(client: Client, count: int) -> None:
    client.wait_for_workers(count, timeout=HANG_GUARD)


def executing(client: Client) -> dict[str, list[str]]:
    """Worker address -> the wasmbox keys it is executing now."""
    found: dict[str, list[str]] = client.run(_executing_keys)
    return {w: keys for w, keys in found.items() if keys}


def _executing_keys(dask_worker: Any = None) -> list[str]:
    return [str(k) for k, ts in dask_worker.state.tasks.items()
            if ts.state == "executing" and str(k).startswith(KEY_PREFIX)]


def _die_mid_chunk(path: str, after_s: float, dask_worker: Any = None) -> bool:
    """On a worker's event loop (its task states cannot change meanwhile): if it has been
    executing a chunk of many tasks for `after_s` and holds no finished chunk, write that
    chunk's key down and SIGKILL the worker process; its result then can never reach the
    scheduler.

    A finished chunk whose result the client has not fetched yet would be computed again
    elsewhere once its worker is gone (Dask recomputes lost results; see the module
    docstring of `wasmbox.distributed`): that re-run is allowed, but it is not the one this
    test counts, so the worker is killed only while it holds no finished answer. False when
    it was not killed."""
    now = time.time()
    mine = {str(k): ts for k, ts in dask_worker.state.tasks.items()
            if str(k).startswith(KEY_PREFIX)}
    if any(ts.state == "memory" for ts in mine.values()):
        return False
    running = [k for k, ts in mine.items()
               if ts.state == "executing" and k.startswith(KEY_PREFIX + "chunk-")
               and ts.start_time is not None and now - ts.start_time > after_s]
    if not running:
        return False
    with open(path, "w") as out:
        out.write(running[0])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
    return True  # never reached


def sends(client: Client) -> tuple[Counter[str], Counter[str], Counter[str], set[str]]:
    """Per wasmbox key, from the scheduler's transition log: how many times it was sent to a
    worker; taken back by work stealing (only once the worker said it had not started it);
    taken back otherwise (its worker was removed). And the stimuli of those other take-backs:
    one per event (a worker's removal takes back all it held under one stimulus)."""
    log = client.run_on_scheduler(lambda dask_scheduler: [
        (str(entry[0]), entry[1], entry[2], str(entry[4]))
        for entry in dask_scheduler.transition_log])
    sent: Counter[str] = Counter()
    stolen: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    why: set[str] = set()
    for key, start, finish, stimulus in log:
        if not key.startswith(KEY_PREFIX):
            continue
        if finish == "processing":
            sent[key] += 1
        if start != "processing" or finish in ("memory", "erred"):
            continue
        if stimulus.startswith("steal-"):
            stolen[key] += 1
        else:
            lost[key] += 1
            why.add(stimulus)
    return sent, stolen, lost, why


def run_in_thread(sandbox: DistributedSandbox, tasks: list[Task]) -> tuple[threading.Thread,
                                                                              list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(sandbox.map(tasks))
        except BaseException as exc:  # the assertion below reports it
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_a_sigkilled_worker_loses_no_task_and_reruns_only_its_chunk(
    processes: Processes, guests: dict[str, Path], tmp_path: Path
) -> None:
    address = processes.scheduler()
    for i in range(2):
        processes.worker(address, f"worker-{i}", nanny=True)  # as `dask worker` deploys
    with Client(address, timeout=HANG_GUARD) as client:
        wait_workers(client, 2)
        sandbox = DistributedSandbox(client)
        warm = [Task.wasm(guests["cpu_kernel"], args=("1000",)) for _ in range(4)]
        assert all(r.ok for r in sandbox.map(warm))
        before = sends(client)
        # A few ms each: after the first wave the batch travels in chunks of many tasks.
        tasks = [Task.wasm(guests["cpu_kernel"], args=("300000",)) for _ in range(600)]
        thread, box = run_in_thread(sandbox, tasks)
        record = tmp_path / "chunk-the-killed-worker-was-running"
        deadline = time.monotonic() + HANG_GUARD
        while not record.exists():
            assert time.monotonic() < deadline and thread.is_alive(), "no chunk was caught"
            for worker, keys in executing(client).items():
                if "chunk-" in keys[0]:
                    with contextlib.suppress(Exception):  # it may die under the call
                        client.run(_die_mid_chunk, str(record), 0.01, workers=[worker])
                    break
            time.sleep(0.002)
        thread.join(HANG_GUARD)
        assert not thread.is_alive(), "map hung after a worker was killed"
        results = box[0]
        assert isinstance(results, list), results
        killed = record.read_text()

        # No task lost: one completed result per task, in order.
        assert [r.task_id for r in results] == [t.id for t in tasks]
        assert all(r.status is Status.COMPLETED for r in results), [
            (r.status, r.reason) for r in results if not r.ok]
        # None run twice beyond the retry: a chunk went to a worker again only when the
        # scheduler took it back from the dead worker (at most once: the chunk it was running,
        # and chunks sent to it that it had not started) or stole it before it started.
        sent, stolen, lost, why = sends(client)
        sent, stolen, lost = sent - before[0], stolen - before[1], lost - before[2]
        assert len(why - before[3]) == 1, why - before[3]  # one event: the worker's death
        assert lost[killed] == 1 and sent[killed] == 2, (killed, sent[killed], lost[killed])
        odd = [key for key, n in sent.items() if n != 1 + lost[key] + stolen[key]]
        assert not odd, client.run_on_scheduler(
            lambda dask_scheduler: [e[:5] for e in dask_scheduler.story(*odd)])
        assert all(n <= 1 for n in lost.values()), lost


def test_a_batch_ends_in_bounded_time_when_every_worker_is_killed(
    processes: Processes, guests: dict[str, Path]
) -> None:
    address = processes.scheduler()
    workers = [processes.worker(address, f"lone-{i}", nanny=False) for i in range(2)]
    with Client(address, timeout=HANG_GUARD) as client:
        wait_workers(client, 2)
        sandbox = DistributedSandbox(client, no_workers_timeout=2.0)
        slow = [Task.wasm(guests["infinite_loop"], resources=Resources(timeout=5))
                for _ in range(6)]
        thread, box = run_in_thread(sandbox, slow)
        deadline = time.monotonic() + HANG_GUARD
        while len(executing(client)) < 2:  # both workers mid-task
            assert time.monotonic() < deadline and thread.is_alive(), "tasks never started"
            time.sleep(0.01)
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
        thread.join(HANG_GUARD)  # a hang guard, not a timing assertion: the bound is 2 s
        assert not thread.is_alive(), "map waited forever once every worker was gone"
    results: list[Result] = box[0]
    assert [r.task_id for r in results] == [t.id for t in slow]
    assert [r.status for r in results] == [Status.FAILED] * len(slow)
    assert all("HostFailure" in (r.reason or "") and "no worker" in (r.reason or "")
               for r in results), [r.reason for r in results]


def test_the_readme_commands_carry_every_cluster_config_setting() -> None:
    """A multi-host cluster gets what `cluster_config()` gives a `LocalCluster`: each key as
    a ``DASK_...`` variable with the same value on the command of the process it concerns."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = {role: next(line for line in lines if line.startswith(f"| {role} |"))
                for role in ("scheduler", "worker")}
    for key, value in cluster_config().items():
        role = "scheduler" if key.startswith("distributed.scheduler.") else "worker"
        variable = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        assert f"{variable}={value} " in commands[role], (key, role)
