"""Monitoring while a task runs: samples from each tier, anomaly rules, and the kill decision.

A tier feeds `Monitor.observe` with a `Sample` whenever `Monitor.due()` says one is wanted
(wasm: from the epoch watchdog, every tick it is due; container: from its cgroup while waiting;
vm: from the QEMU process). The monitor keeps a bounded history, raises each rule's event at
most once, and returns a kill reason when a rule the policy lists in ``kill_on`` fires.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from wasmbox.models import AnomalyRule, Event, MonitorPolicy

_HISTORY = 256


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation of a running task; None where a tier cannot measure a quantity."""

    at_s: float
    memory_bytes: int | None = None
    memory_cap: int | None = None
    cpu_s: float | None = None
    throttled_s: float | None = None
    fuel_consumed: int | None = None
    output_bytes: int = 0  # /task/output plus captured stdout and stderr
    stderr_bytes: int = 0
    net_bytes: int | None = None


class Monitor:
    """Anomaly rules over the samples of one run. Not shared between runs."""

    __slots__ = (
        "_fuel_rates", "_next_at", "_throttled_run", "events", "killed", "policy", "samples",
        "started",
    )

    def __init__(self, policy: MonitorPolicy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.samples: deque[Sample] = deque(maxlen=_HISTORY)
        self.events: list[Event] = []
        self.killed: Event | None = None
        self._next_at = self.started + policy.interval
        self._fuel_rates: list[float] = []
        self._throttled_run = 0

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def due(self) -> bool:
        """True when the next sample is wanted (at most one per interval)."""
        if not self.policy.enabled:
            return False
        now = time.monotonic()
        if now < self._next_at:
            return False
        self._next_at = now + self.policy.interval
        return True

    def observe(self, sample: Sample) -> str | None:
        """Record a sample; returns a reason to stop the task if a kill rule fired."""
        previous = self.samples[-1] if self.samples else None
        self.samples.append(sample)
        for rule, message in self._check(previous, sample):
            if any(e.rule is rule for e in self.events):
                continue
            kill = rule in self.policy.kill_on
            event = Event(rule=rule, message=message, at_s=sample.at_s, killed=kill)
            self.events.append(event)
            if kill and self.killed is None:
                self.killed = event
        if self.killed is not None:
            return f"anomaly {self.killed.rule}: {self.killed.message}"
        return None

    def _check(self, prev: Sample | None, cur: Sample) -> list[tuple[AnomalyRule, str]]:
        p = self.policy
        found: list[tuple[AnomalyRule, str]] = []
        memory, cap = cur.memory_bytes, cur.memory_cap
        if memory is not None and cap and memory >= p.memory_near_cap * cap:
            found.append((AnomalyRule.MEMORY_NEAR_CAP, f"memory {memory} of {cap} bytes"))
        if cur.stderr_bytes > p.stderr_bytes:
            found.append((AnomalyRule.STDERR_RUNAWAY, f"stderr at {cur.stderr_bytes} bytes"))
        if prev is None:
            return found
        dt = cur.at_s - prev.at_s
        if dt <= 0:
            return found
        rate = (cur.output_bytes - prev.output_bytes) / dt
        if rate > p.output_rate:
            found.append((AnomalyRule.OUTPUT_FLOOD, f"writing {rate:.0f} bytes/s"))
        if cur.throttled_s is not None and prev.throttled_s is not None:
            throttled = (cur.throttled_s - prev.throttled_s) / dt >= p.throttled_fraction
            self._throttled_run = self._throttled_run + 1 if throttled else 0
            if self._throttled_run >= p.throttled_samples:
                found.append((AnomalyRule.CPU_THROTTLED,
                              f"throttled for {self._throttled_run} samples in a row"))
        if cur.fuel_consumed is not None and prev.fuel_consumed is not None:
            burn = (cur.fuel_consumed - prev.fuel_consumed) / dt
            rates = self._fuel_rates
            baseline = sorted(rates)[len(rates) // 2] if rates else 0.0
            if len(rates) >= 3 and baseline > 0 and burn > p.fuel_spike_factor * baseline:
                found.append((AnomalyRule.FUEL_SPIKE,
                              f"fuel burn {burn:.0f}/s against a baseline of {baseline:.0f}/s"))
            self._fuel_rates.append(burn)
            if len(self._fuel_rates) > _HISTORY:
                del self._fuel_rates[0]
        return found
