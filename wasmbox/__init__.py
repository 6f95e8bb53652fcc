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
    DenyAction,
    FilesystemPolicy,
    Limits,
    Metrics,
    NetworkPolicy,
    OutputPolicy,
    Policy,
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
    "Availability",
    "ConfigError",
    "DenyAction",
    "FilesystemPolicy",
    "HostFailure",
    "InputRejected",
    "InvalidTask",
    "Limits",
    "Metrics",
    "ModuleRejected",
    "NetworkPolicy",
    "OutputPolicy",
    "Plan",
    "Policy",
    "PolicyViolation",
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
