"""The subreaper's duties: container inits re-parent to us (we wait for them by pid), and so
do the runtime's short-lived helper processes, which we must reap or they stay zombies.

A child is reaped here only when it is a zombie of a runtime binary that no one waits for:
runtime commands we spawn and container inits are registered while they are ours to wait on.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from typing import Any

from wasmbox.errors import HostFailure

_PR_SET_CHILD_SUBREAPER = 36
_RUNTIME_NAMES = frozenset({"crun", "runc", "runsc", "runsc-gofer", "runsc-sandbox", "exe"})
_lock = threading.Lock()
_waited: set[int] = set()  # pids someone will wait for


def become_subreaper() -> None:
    """Make orphaned descendants (container inits among them) re-parent to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise HostFailure(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen`, registered so the orphan reaper never takes its exit status."""
    with _lock:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)
        _waited.add(proc.pid)
    return proc


def claim(pid: int) -> None:
    """Mark `pid` (a container init) as waited for by its owner."""
    with _lock:
        _waited.add(pid)


def release(pid: int) -> None:
    """`pid` has been waited for; forget it."""
    with _lock:
        _waited.discard(pid)


def reap_orphans() -> int:
    """Reap zombie runtime helpers nobody waits for; returns how many."""
    reaped = 0
    with _lock:
        for pid in _children():
            if pid in _waited or not _is_runtime_zombie(pid):
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            reaped += done == pid
    return reaped


def _children() -> list[int]:
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    return pids


def _is_runtime_zombie(pid: int) -> bool:
    # Runtime helpers run as root; a container init that died before exec still carries
    # the runtime's name but the guest's uid, and its owner waits for it. gVisor's ptrace
    # stubs (one per guest address space, re-exec'd as "exe") run as the guest's uid and
    # re-parent to us when the sandbox ends: nobody else waits for them.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return rest.split()[:1] == ["Z"] and name in _RUNTIME_NAMES and (uid == 0 or name == "exe")
