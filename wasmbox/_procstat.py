"""Internal: what /proc says about a process (state, parent, memory, CPU, time starved of
a CPU), for the tiers that run one."""

from __future__ import annotations

import os


def rss_bytes(pid: int) -> int | None:
    """Resident memory of the process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then the
    parent's pid, ...); empty when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return []


def cpu_seconds(pid: int) -> float | None:
    """CPU time the process has used (all its threads)."""
    fields = stat_fields(pid)
    if len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queued_seconds(pid: int) -> float | None:
    """The longest time one of the process's threads has been runnable but waiting for a
    CPU (``/proc/PID/task/*/schedstat``); None where the kernel does not report it."""
    longest: float | None = None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                waited = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
        longest = waited if longest is None else max(longest, waited)
    return longest
