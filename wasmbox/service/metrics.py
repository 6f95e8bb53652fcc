"""Prometheus metrics of one service instance (its own registry, so instances never mix).

Its metrics are named ``wasmbox_service_*``; `render` appends them to the library's run
metrics (``wasmbox_runs_total``, ``wasmbox_run_seconds`` ..., prometheus-client's default
registry, see `wasmbox.telemetry`), so no name appears twice.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from wasmbox.models import Result

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """Counters per status and tier, latency, queue depth and running tasks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.finished = Counter(
            "wasmbox_service_tasks_finished", "Tasks that reached a result, by status and tier.",
            ["status", "tier"], registry=self.registry,
        )
        self.rejected = Counter(
            "wasmbox_service_tasks_rejected", "Tasks the host refused to run, by reason.",
            ["reason"], registry=self.registry,
        )
        self.refused = Counter(
            "wasmbox_service_submissions_refused",
            "Submissions refused at the door, by HTTP status.", ["code"], registry=self.registry,
        )
        self.accepted = Counter(
            "wasmbox_service_tasks_accepted", "Tasks accepted and journaled.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "wasmbox_service_task_latency_seconds", "From acceptance to result.",
            ["tier"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "wasmbox_service_queue_depth", "Tasks accepted and waiting to run.",
            registry=self.registry,
        )
        self.running = Gauge(
            "wasmbox_service_running_tasks", "Tasks running now.", registry=self.registry,
        )

    def observe(self, result: Result, latency_s: float) -> None:
        """Count one finished task."""
        self.finished.labels(status=str(result.status), tier=str(result.tier)).inc()
        self.latency.labels(tier=str(result.tier)).observe(latency_s)

    def render(self) -> bytes:
        """The text exposition format: the library's run metrics, then the service's."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)
