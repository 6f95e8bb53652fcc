"""Prometheus metrics and structured run logs.

Metrics live in prometheus-client's default registry, so an application (or ``wasmbox serve``)
exports them with ``prometheus_client.generate_latest()``. Each finished run also logs one
record on the ``wasmbox.run`` logger with its run id and outcome as ``extra`` fields; nothing
is formatted unless that logger is enabled.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from wasmbox.models import Result

RUNS = Counter("wasmbox_runs", "Finished runs by tier and status", ["tier", "status"])
RUN_SECONDS = Histogram(
    "wasmbox_run_seconds",
    "Wall-clock time of a run, end to end",
    ["tier"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RUNNING = Gauge("wasmbox_running_tasks", "Tasks running now", ["tier"])
LIVE_SANDBOXES = Gauge("wasmbox_live_sandboxes", "Open Sandbox objects")
ANOMALIES = Counter("wasmbox_anomalies", "Anomaly events by rule", ["rule", "killed"])
NET_BYTES = Counter(
    "wasmbox_net_bytes", "Bytes networked tasks received (rx) and sent (tx)",
    ["tier", "direction"],
)
POOL_REQUESTS = Counter(
    "wasmbox_pool_requests", "Pool acquisitions by tier and result", ["tier", "result"]
)

log = logging.getLogger("wasmbox.run")


def record(result: Result) -> None:
    """Count a finished run and log it."""
    RUNS.labels(result.tier.value, result.status.value).inc()
    RUN_SECONDS.labels(result.tier.value).observe(result.metrics.wall_s)
    for event in result.events:
        ANOMALIES.labels(event.rule.value, str(event.killed).lower()).inc()
    for direction, count in (("rx", result.metrics.net_rx_bytes),
                             ("tx", result.metrics.net_tx_bytes)):
        if count:
            NET_BYTES.labels(result.tier.value, direction).inc(count)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "run %s %s on %s in %.3f ms",
            result.run_id, result.status.value, result.tier.value, result.metrics.wall_s * 1e3,
            extra={
                "run_id": result.run_id,
                "task_id": result.task_id,
                "tier": result.tier.value,
                "status": result.status.value,
                "exit_code": result.exit_code,
                "reason": result.reason,
                "wall_s": result.metrics.wall_s,
                "events": [e.rule.value for e in result.events],
            },
        )
