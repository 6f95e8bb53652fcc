"""A run's results, read once: the task JSON checked up front, then streams and outputs
read, capped and filtered, and the `Result` assembled from them and the tier's `Outcome`."""

from __future__ import annotations

import dataclasses
import uuid

from wasmbox.models import Metrics, Result, Status
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan
from wasmbox.tiers.base import Outcome
from wasmbox.validation import compile_schema
from wasmbox.workspace import Collected, Workspace, encode_input, filter_stream, redact_text

# Statuses after which outputs are still collected and checked (the guest ran to its end).
COLLECTED = (Status.COMPLETED, Status.FAILED)


def check_task_json(plan: Plan) -> bytes:
    """Compile the task's schemas and encode its input, or raise `InputRejected`."""
    task = plan.task
    if task.input_schema is not None:
        compile_schema(task.input_schema, what="input_schema")
    if task.output_schema is not None:
        compile_schema(task.output_schema, what="output_schema")
    return encode_input(plan)


def collect(plan: Plan, workspace: Workspace, outcome: Outcome) -> Collected:
    """Outputs of a run that reached its end, its streams, and the filters' verdict: the
    one place a run's results are read, capped and filtered.

    Streams are filtered whatever the status (a guest that leaks a secret and then loops
    must not get it out through a TIMEOUT); a rejected stream comes back redacted.
    """
    collected = Collected()
    if outcome.status in COLLECTED:
        collected = workspace.collect()
    streams = workspace.read_streams()
    stdout, out_rejection = filter_stream(streams.stdout, plan.output, "stdout")
    stderr, err_rejection = filter_stream(streams.stderr, plan.output, "stderr")
    rejection = out_rejection or err_rejection
    if rejection and collected.rejection is None and outcome.status in COLLECTED:
        collected = Collected(rejection=rejection)
    collected.streams = dataclasses.replace(streams, stdout=stdout, stderr=stderr)
    return collected


def assemble(
    plan: Plan,
    outcome: Outcome,
    collected: Collected,
    monitor: Monitor,
    *,
    cleanup_s: float,
    wall_s: float,
) -> Result:
    status, reason, streams = outcome.status, outcome.reason, collected.streams
    if collected.rejection is not None:
        status, reason = Status.OUTPUT_REJECTED, collected.rejection
    if reason is not None:  # reasons quote guest text (exceptions, schema messages)
        reason = redact_text(reason, plan.output)
    # Everything below is produced by our own code: skip re-validation on the hot path.
    metrics = Metrics.model_construct(
        startup_s=outcome.startup_s,
        run_s=outcome.run_s,
        cleanup_s=cleanup_s,
        wall_s=wall_s,
        cpu_s=outcome.cpu_s,
        fuel_consumed=outcome.fuel_consumed,
        peak_memory_bytes=outcome.peak_memory_bytes,
        stdout_bytes=len(streams.stdout),
        stderr_bytes=len(streams.stderr),
        output_bytes=collected.total_bytes,
        output_files=len(collected.files),
        net_rx_bytes=_count(outcome.extra.pop("net_rx_bytes", None)),
        net_tx_bytes=_count(outcome.extra.pop("net_tx_bytes", None)),
        extra=outcome.extra,
    )
    return Result.model_construct(
        task_id=plan.task.id,
        run_id=uuid.uuid4().hex,
        tier=plan.tier,
        status=status,
        exit_code=outcome.exit_code,
        trap=outcome.trap,
        reason=reason,
        output=collected.output if collected.rejection is None else None,
        files=collected.files if collected.rejection is None else {},
        stdout=streams.stdout.decode("utf-8", "replace"),
        stderr=streams.stderr.decode("utf-8", "replace"),
        stdout_truncated=streams.stdout_truncated,
        stderr_truncated=streams.stderr_truncated,
        metrics=metrics,
        events=tuple(monitor.events),
    )


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)
