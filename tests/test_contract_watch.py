"""One in-run watch for every tier (`tiers.watch.RunWatch`): the deadline and cancellation,
then monitor samples (a kill rule is an ANOMALY), then the output caps, first stop kept."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from wasmbox import Policy, Status, Task
from wasmbox.lifecycle import Deadline
from wasmbox.models import AnomalyRule, MonitorPolicy, OutputPolicy
from wasmbox.monitor import Monitor, Sample
from wasmbox.policy import apply
from wasmbox.tiers.watch import DEADLINE_PASSED, RunWatch, Stop
from wasmbox.workspace import RUNNING, Workspace

QUIET = MonitorPolicy(enabled=False)


def _workspace(tmp_path: Path, policy: Policy | None = None) -> Workspace:
    return Workspace(apply(policy or Policy(), Task.wasm(b"\0asm\1\0\0\0")), tmp_path)


def test_a_passed_deadline_stops_with_timeout() -> None:
    watch = RunWatch(Deadline(0), Monitor(QUIET))
    assert watch() == Stop(Status.TIMEOUT, DEADLINE_PASSED)
    assert RunWatch(Deadline(60), Monitor(QUIET))() is None


def test_grace_waits_for_the_guests_own_report_but_not_for_a_cancel() -> None:
    deadline = Deadline(0)
    watch = RunWatch(deadline, Monitor(QUIET), grace=60)
    assert watch() is None  # past the deadline, inside the grace: the guest may still report
    deadline.cancel()
    assert watch() == Stop(Status.TIMEOUT, DEADLINE_PASSED)


def test_a_kill_rule_stops_with_anomaly_from_the_tiers_probe() -> None:
    policy = MonitorPolicy(interval=0.001, memory_near_cap=0.5,
                           kill_on=frozenset({AnomalyRule.MEMORY_NEAR_CAP}))
    monitor = Monitor(policy)
    time.sleep(0.01)  # past the first interval: a sample is due
    seen: list[Sample] = []

    def probe(base: Sample) -> Sample:
        seen.append(base)
        return Sample(at_s=base.at_s, memory_bytes=90, memory_cap=100)

    stop = RunWatch(Deadline(60), monitor, probe)()
    assert stop is not None and stop.status is Status.ANOMALY
    assert "memory_near_cap" in stop.reason and len(seen) == 1


def test_output_caps_stop_with_output_rejected_and_the_first_stop_is_kept(
        tmp_path: Path) -> None:
    policy = Policy(output=OutputPolicy(max_file_bytes=10))
    with _workspace(tmp_path, policy) as ws:
        deadline = Deadline(60)
        watch = RunWatch(deadline, Monitor(QUIET), view=ws)
        assert watch() is None
        Path(ws.output_dir, "big").write_bytes(b"x" * 11)
        stop = watch()
        assert stop is not None and stop.status is Status.OUTPUT_REJECTED
        assert stop.reason.startswith(RUNNING)
        deadline.cancel()
        assert watch() is stop  # a later timeout does not rewrite why the guest was stopped


def test_the_sample_counts_outputs_and_streams(tmp_path: Path) -> None:
    with _workspace(tmp_path) as ws:
        Path(ws.output_dir, "a").write_bytes(b"x" * 5)
        Path(ws.stderr_path).write_bytes(b"e" * 3)
        sample = RunWatch(Deadline(60), Monitor(QUIET), view=ws).sample()
    assert (sample.output_bytes, sample.stderr_bytes) == (8, 3)


def test_wait_returns_none_when_the_guest_ends_and_a_stop_when_cancelled() -> None:
    ended = threading.Event()
    ended.set()
    assert RunWatch(Deadline(60), Monitor(QUIET)).wait(ended.wait, 0.01) is None
    deadline = Deadline(None)
    timer = threading.Timer(0.05, deadline.cancel)
    timer.start()
    try:
        stop = RunWatch(deadline, Monitor(QUIET), grace=60).wait(threading.Event().wait, 0.01)
    finally:
        timer.cancel()
    assert stop == Stop(Status.TIMEOUT, DEADLINE_PASSED)
