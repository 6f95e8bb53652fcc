"""Internal: the vocabulary of wasmbox — statuses, tier names, task kinds, capability names.

Public through `wasmbox` and `wasmbox.models`; import from there.
"""

from __future__ import annotations

import difflib
from enum import StrEnum


class Status(StrEnum):
    """How a run ended. Everything but COMPLETED is a guest fault or a guard that tripped."""

    COMPLETED = "completed"
    FAILED = "failed"  # the task exited non-zero (or raised, for Python tasks)
    TIMEOUT = "timeout"  # the wall-clock deadline passed
    OUT_OF_FUEL = "out_of_fuel"  # the CPU budget (wasm fuel) ran out
    MEMORY_EXCEEDED = "memory_exceeded"  # the guest hit its memory cap
    CRASHED = "crashed"  # a trap or signal other than the above
    OUTPUT_REJECTED = "output_rejected"  # outputs broke a cap, a filter or the output schema
    ANOMALY = "anomaly"  # a monitoring rule killed the task
    CANCELLED = "cancelled"  # the caller cancelled the run


class TierName(StrEnum):
    """Isolation tiers, lightest first. AUTO lets the sandbox choose."""

    AUTO = "auto"
    WASM = "wasm"
    CONTAINER = "container"
    VM = "vm"


ISOLATION_ORDER: tuple[TierName, ...] = (TierName.WASM, TierName.CONTAINER, TierName.VM)


class TaskKind(StrEnum):
    """What the task's code is."""

    WASM = "wasm"  # a WASI preview-1 command module
    PYTHON = "python"  # Python source run by an isolated interpreter
    COMMAND = "command"  # a native argv (container and VM tiers)


class DenyAction(StrEnum):
    """What an output deny pattern does when it matches."""

    REJECT = "reject"  # the whole run becomes OUTPUT_REJECTED
    REDACT = "redact"  # the match is replaced by ``[REDACTED]``


class AnomalyRule(StrEnum):
    """Monitoring rules; each fires at most once per run."""

    MEMORY_NEAR_CAP = "memory_near_cap"  # memory use at or above a fraction of the cap
    CPU_THROTTLED = "cpu_throttled"  # sustained CPU throttling (container cgroups)
    OUTPUT_FLOOD = "output_flood"  # output + stdio written faster than a rate
    FUEL_SPIKE = "fuel_spike"  # fuel burn rate jumps far above the run's own baseline
    STDERR_RUNAWAY = "stderr_runaway"  # stderr grows past a size


# Linux capabilities (capability.h, 6.x); a name outside this list is a typo.
CAPABILITIES: frozenset[str] = frozenset("CAP_" + n for n in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
))


def check_capability(name: str) -> str:
    """`name` if it is a Linux capability spelled ``CAP_*``; raises ValueError otherwise."""
    if name not in CAPABILITIES:
        near = difflib.get_close_matches(str(name).upper(), sorted(CAPABILITIES), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"{name!r} is not a capability name like CAP_NET_BIND_SERVICE{hint}")
    return name
