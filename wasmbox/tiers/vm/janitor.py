"""Per-run state directories named after their owner's pid, and the janitor that reclaims them.

Every VmTier keeps its QEMU processes, sockets and images under
``<workspace root>/wasmbox-vm-<pid>-<token>/``. A host process that was killed leaves such a
directory behind; the next VmTier finds it, kills the QEMU processes recorded inside (only if
their command line still names that directory, so a recycled pid is never hit) and removes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from wasmbox._owned import make_owned_dir, reclaim_owned
from wasmbox.workspace import workspace_root

PREFIX = "wasmbox-vm-"
PID_FILE = "qemu.pid"


def claim_run_dir(root: Path | None = None) -> Path:
    """Reclaim what dead owners left, then create this process's own run directory."""
    root = root or Path(workspace_root())
    reclaim(root)
    return Path(make_owned_dir(str(root), PREFIX))


def reclaim(root: Path | None = None) -> list[Path]:
    """Remove run directories whose owning pid is gone, killing their QEMU first."""
    found = reclaim_owned(root or Path(workspace_root()), PREFIX,
                          before=lambda path: kill_machines(Path(path)))
    return [Path(path) for path in found]


def kill_machines(run_dir: Path) -> None:
    """SIGKILL every QEMU recorded under `run_dir` (a snapshot's template one level deeper)
    that still belongs to it."""
    for pid_file in [*run_dir.glob(f"*/{PID_FILE}"), *run_dir.glob(f"*/*/{PID_FILE}")]:
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(run_dir).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

