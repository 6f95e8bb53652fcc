"""Internal: what /proc says about a QEMU process (memory, CPU, time starved of a CPU)."""

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


def cpu_seconds(pid: int) -> float | None:
    """CPU time the process has used (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
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
