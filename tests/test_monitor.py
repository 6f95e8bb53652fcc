"""Monitoring: anomaly rules raise events, and a rule the policy names kills the task."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmbox import Policy, Resources, Sandbox, Status, Task
from wasmbox.models import AnomalyRule, MonitorPolicy, OutputPolicy
from wasmbox.monitor import Monitor, Sample

MakeSandbox = Callable[..., Sandbox]


def test_memory_near_cap_kills_the_memory_bomb_when_the_policy_says_so(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    policy = Policy(monitor=MonitorPolicy(interval="10ms", memory_near_cap=0.25,
                                          kill_on=frozenset({AnomalyRule.MEMORY_NEAR_CAP})))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["memory_bomb"], resources=Resources(memory="256M")))
    assert r.status is Status.ANOMALY
    assert (r.reason or "").startswith("anomaly memory_near_cap")
    assert [e.rule for e in r.events] == [AnomalyRule.MEMORY_NEAR_CAP]
    assert r.events[0].killed


def test_an_anomaly_not_in_kill_on_is_only_reported(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    policy = Policy(monitor=MonitorPolicy(interval="10ms", memory_near_cap=0.25))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["memory_bomb"], resources=Resources(memory="64M")))
    assert r.status is Status.MEMORY_EXCEEDED
    assert AnomalyRule.MEMORY_NEAR_CAP in {e.rule for e in r.events}
    assert not any(e.killed for e in r.events)


def test_an_output_flood_can_kill(make_sandbox: MakeSandbox, guests: dict[str, Path]) -> None:
    policy = Policy(
        monitor=MonitorPolicy(interval="10ms", output_rate="1MiB",
                              kill_on=frozenset({AnomalyRule.OUTPUT_FLOOD})),
        output=OutputPolicy(max_file_bytes="1GiB", max_total_bytes="1GiB"),
    )
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["output_size_flood"]))
    assert r.status is Status.ANOMALY
    assert r.events[0].rule is AnomalyRule.OUTPUT_FLOOD


def test_a_quiet_task_raises_nothing(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["json_transform"], input={"xs": [1]}))
    assert r.events == ()


def test_fuel_spike_needs_a_baseline_first() -> None:
    monitor = Monitor(MonitorPolicy(fuel_spike_factor=5))
    for i in range(4):
        assert monitor.observe(Sample(at_s=i * 0.1, fuel_consumed=i * 1000)) is None
    assert monitor.events == []
    monitor.observe(Sample(at_s=0.5, fuel_consumed=3000 + 100_000))
    assert [e.rule for e in monitor.events] == [AnomalyRule.FUEL_SPIKE]


def test_sustained_throttling_is_raised_once() -> None:
    monitor = Monitor(MonitorPolicy(throttled_fraction=0.5, throttled_samples=3))
    for i in range(8):
        monitor.observe(Sample(at_s=i * 0.1, throttled_s=i * 0.08))
    assert [e.rule for e in monitor.events] == [AnomalyRule.CPU_THROTTLED]


def test_a_disabled_monitor_never_samples() -> None:
    assert not Monitor(MonitorPolicy(enabled=False, interval="1us")).due()


def test_runs_are_counted_for_prometheus(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    from prometheus_client import REGISTRY

    def count(status: str) -> float:
        value = REGISTRY.get_sample_value(
            "wasmbox_runs_total", {"tier": "wasm", "status": status}
        )
        return value or 0.0

    before = count("completed"), count("failed")
    sandbox.run(Task.wasm(guests["hello"]))
    sandbox.run(Task.wasm(guests["bad_exit"]))
    assert (count("completed"), count("failed")) == (before[0] + 1, before[1] + 1)


def test_each_run_logs_one_record_with_its_run_id(
    sandbox: Sandbox, guests: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="wasmbox.run"):
        r = sandbox.run(Task.wasm(guests["hello"]))
    records = [rec for rec in caplog.records if rec.name == "wasmbox.run"]
    assert len(records) == 1
    assert records[0].run_id == r.run_id  # type: ignore[attr-defined]
    assert records[0].status == "completed"  # type: ignore[attr-defined]
