"""A run's results, read once: the task JSON checked up front, then streams and outputs
read, capped and filtered, and the `Result` assembled from them and the tier's `Outcome`."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, TypeVar

from pydantic import BaseModel

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
    if stdout is not streams.stdout or stderr is not streams.stderr:
        streams = dataclasses.replace(streams, stdout=stdout, stderr=stderr)
    collected.streams = streams
    return collected


def assemble(
    plan: Plan,
    outcome: Outcome,
    collected: Collected,
    monitor: Monitor,
    *,
    cleanup_s: float,
    wall_s: float,
    update: dict[str, Any] | None = None,
) -> Result:
    """The run's `Result`; `update` sets fields left at their defaults otherwise
    (``warnings``, ``escalated_from``...)."""
    status, reason, streams = outcome.status, outcome.reason, collected.streams
    if collected.rejection is not None:
        status, reason = Status.OUTPUT_REJECTED, collected.rejection
    if reason is not None:  # reasons quote guest text (exceptions, schema messages)
        reason = redact_text(reason, plan.output)
    # Everything below is produced by our own code: skip re-validation on the hot path.
    metrics = trusted(Metrics, dict(
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
    ))
    values: dict[str, Any] = dict(
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
    if update:
        values.update(update)
    return trusted(Result, values)


M = TypeVar("M", bound=BaseModel)
_SET = object.__setattr__
# Per model class: its fields in order and how to make each default (pydantic's own).
_FIELDS: dict[type[BaseModel], tuple[tuple[str, Any], ...]] = {}


def trusted(cls: type[M], values: dict[str, Any]) -> M:
    """``cls.model_construct(**values)`` (no validation: the values are our own) without
    pydantic's per-call field loop; the same instance, `model_fields_set` included.

    Falls back to `model_construct` for a model with a post-init hook or private
    attributes, which this shortcut does not run.
    """
    fields = _FIELDS.get(cls)
    if fields is None:
        if cls.__pydantic_post_init__ or cls.__private_attributes__:
            return cls.model_construct(**values)
        fields = _FIELDS[cls] = tuple(cls.__pydantic_fields__.items())
    data = {}
    for name, field in fields:
        if name in values:
            data[name] = values[name]
        elif not field.is_required():
            data[name] = field.get_default(call_default_factory=True, validated_data=data)
    model = cls.__new__(cls)
    _SET(model, "__dict__", data)
    _SET(model, "__pydantic_fields_set__", set(values))
    _SET(model, "__pydantic_extra__", None)
    _SET(model, "__pydantic_private__", None)
    return model


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)
