"""The data wasmbox speaks: tasks, policies, results. Validation only, no behaviour.

Sizes accept integers (bytes) or strings such as ``"64M"``/``"64MiB"`` (binary) and ``"64MB"``
(decimal); durations accept seconds or strings such as ``"250ms"``, ``"5s"``, ``"2m"``.

The definitions live in `wasmbox._models` by concern (units, kinds, task, network, policy,
result); this module is the one import path for all of them.
"""

from __future__ import annotations

from wasmbox._models.kinds import (
    CAPABILITIES,
    ISOLATION_ORDER,
    AnomalyRule,
    DenyAction,
    Status,
    TaskKind,
    TierName,
    check_capability,
)
from wasmbox._models.network import Endpoint, NetworkPolicy, Port, parse_endpoints
from wasmbox._models.policy import (
    SAFE_WASI_IMPORTS,
    FilesystemPolicy,
    Limits,
    MonitorPolicy,
    OutputPolicy,
    Policy,
    PythonPolicy,
    TimeoutPolicy,
    WasiPolicy,
)
from wasmbox._models.result import Event, Metrics, Result
from wasmbox._models.task import Resources, Task
from wasmbox._models.units import (
    Bytes,
    GiB,
    KiB,
    MiB,
    Seconds,
    parse_duration,
    parse_size,
)

__all__ = [
    "CAPABILITIES",
    "ISOLATION_ORDER",
    "SAFE_WASI_IMPORTS",
    "AnomalyRule",
    "Bytes",
    "DenyAction",
    "Endpoint",
    "Event",
    "FilesystemPolicy",
    "GiB",
    "KiB",
    "Limits",
    "Metrics",
    "MiB",
    "MonitorPolicy",
    "NetworkPolicy",
    "OutputPolicy",
    "Policy",
    "Port",
    "PythonPolicy",
    "Resources",
    "Result",
    "Seconds",
    "Status",
    "Task",
    "TaskKind",
    "TierName",
    "TimeoutPolicy",
    "WasiPolicy",
    "check_capability",
    "parse_duration",
    "parse_endpoints",
    "parse_size",
]
