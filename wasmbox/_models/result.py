"""Internal: what comes back — `Result`, its `Metrics` and monitor `Event`s.

Public through `wasmbox` and `wasmbox.models`; import from there.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import Field, JsonValue

from wasmbox._models.kinds import AnomalyRule, Status, TierName
from wasmbox._models.units import Frozen


class Metrics(Frozen):
    """Measurements of one run. Durations in seconds; None where a tier cannot measure."""

    startup_s: float = 0.0
    run_s: float = 0.0
    cleanup_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float | None = None
    fuel_consumed: int | None = None
    peak_memory_bytes: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_bytes: int = 0
    output_files: int = 0
    net_rx_bytes: int | None = None  # networked container tasks: the namespace's counters
    net_tx_bytes: int | None = None
    extra: dict[str, float] = Field(default_factory=dict)


class Event(Frozen):
    """An anomaly the monitor saw during a run."""

    rule: AnomalyRule
    message: str
    at_s: float  # seconds since the run started
    killed: bool = False


FileT = TypeVar("FileT")


class ResultShape(Frozen, Generic[FileT]):
    """Internal: the fields of a `Result`, with ``files`` mapping each output file to a
    `FileT` — its bytes in `Result`, its size in the HTTP API's ``ResultView``. Every view
    of a result derives from this, so a field added here shows everywhere."""

    task_id: str
    run_id: str
    tier: TierName
    status: Status
    exit_code: int | None = None
    trap: str | None = None
    reason: str | None = None
    output: JsonValue = None
    files: dict[str, FileT] = Field(default_factory=dict, repr=False)
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    metrics: Metrics = Metrics()
    events: tuple[Event, ...] = ()
    escalated_from: TierName | None = None  # set when ``auto`` had to use a heavier tier
    escalation_reason: str | None = None
    warnings: tuple[str, ...] = ()  # one line each: requests the policy lowered, and why


class Result(ResultShape[bytes]):
    """The typed outcome of a run. Guest faults are statuses here, never exceptions."""

    @property
    def ok(self) -> bool:
        """True when the task completed and its outputs passed every check."""
        return self.status is Status.COMPLETED

    @property
    def truncated(self) -> bool:
        """True when stdout or stderr hit its cap."""
        return self.stdout_truncated or self.stderr_truncated
