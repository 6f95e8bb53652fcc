"""wasmbox: run untrusted tasks in sandboxes (wasm, container, vm) behind one API."""

from wasmbox.errors import (
    ConfigError,
    HostFailure,
    InputRejected,
    InvalidTask,
    ModuleRejected,
    PolicyViolation,
    SandboxClosed,
    SandboxError,
    TierUnavailable,
)
from wasmbox.models import (
    AnomalyRule,
    DenyAction,
    Event,
    FilesystemPolicy,
    Limits,
    Metrics,
    MonitorPolicy,
    NetworkPolicy,
    OutputPolicy,
    Policy,
    PythonPolicy,
    Resources,
    Result,
    Status,
    Task,
    TaskKind,
    TierName,
    TimeoutPolicy,
    WasiPolicy,
)
from wasmbox.policy import Plan, apply
from wasmbox.sandbox import Sandbox
from wasmbox.tiers.base import Availability

__version__ = "0.1.0"

__all__ = [
    "AnomalyRule",
    "Availability",
    "ConfigError",
    "DenyAction",
    "Event",
    "FilesystemPolicy",
    "HostFailure",
    "InputRejected",
    "InvalidTask",
    "Limits",
    "Metrics",
    "ModuleRejected",
    "MonitorPolicy",
    "NetworkPolicy",
    "OutputPolicy",
    "Plan",
    "Policy",
    "PolicyViolation",
    "PythonPolicy",
    "Resources",
    "Result",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "Status",
    "Task",
    "TaskKind",
    "TierName",
    "TierUnavailable",
    "TimeoutPolicy",
    "WasiPolicy",
    "apply",
]
