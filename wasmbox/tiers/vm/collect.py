"""Reading a finished guest: its exit line into an outcome, its output disk into the workspace.

Internal: part of the VM tier (`wasmbox.tiers.vm`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from wasmbox.models import Status
from wasmbox.policy import Plan
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.vm.machine import ExitLine
from wasmbox.workspace import Workspace


def classify(outcome: Outcome, line: ExitLine, plan: Plan) -> None:
    """Set the outcome's status, code and metrics from the guest's exit line."""
    outcome.exit_code = line.code
    if "cpu_us" in line.values:
        outcome.cpu_s = line.values["cpu_us"] / 1e6
    if "peak" in line.values:
        outcome.peak_memory_bytes = line.values["peak"]
    if "timeout" in line.flags:
        outcome.status, outcome.reason = Status.TIMEOUT, "wall-clock deadline passed"
        outcome.exit_code = None
    elif "oom" in line.flags:
        outcome.status = Status.MEMORY_EXCEEDED
        outcome.reason = f"the task hit its {plan.memory} byte memory cap"
        outcome.exit_code = None
    elif "ship" in line.flags:
        outcome.status = Status.OUTPUT_REJECTED
        outcome.reason = "outputs overflowed the output disk"
    elif line.code == 0:
        outcome.status = Status.COMPLETED
    elif line.code > 128:
        outcome.status, outcome.trap = Status.CRASHED, f"signal {line.code - 128}"
        outcome.reason = f"the task was killed by signal {line.code - 128}"
    else:
        outcome.status = Status.FAILED


def unpack(image: Path, workspace: Workspace, plan: Plan) -> None:
    """Extract the guest's tar: regular files and dirs under output/, the two streams.

    The guest may be hostile (a task that became root in it): sizes are checked against the
    disk before anything is written, sparse members are refused, and so is a member whose
    normalised name is absolute, has a ``..`` component, or lies outside ``output/`` and the
    two streams. Outputs are extracted into the output directory with the prefix stripped,
    so nothing can land beside it; tarfile's "data" filter is a second line of defence and
    links and special files are dropped.
    """
    limit = plan.output.max_files + 64
    budget = image.stat().st_size
    with tarfile.open(image, "r:") as tar:
        outputs: list[tarfile.TarInfo] = []
        streams: list[tarfile.TarInfo] = []
        for count, member in enumerate(tar):
            if count > limit:
                break
            budget -= member.size
            if member.issparse() or budget < 0:
                raise tarfile.TarError(f"{member.name!r} claims more than the disk holds")
            top, rest = member_path(member.name)
            if top == "streams" and rest in ("stdout", "stderr") and member.isreg():
                member.name = rest
                streams.append(member)
            elif top == "output" and rest and (member.isreg() or member.isdir()):
                member.name = rest
                outputs.append(member)
        tar.extractall(workspace.output_dir, members=outputs, filter="data")
        tar.extractall(workspace.path, members=streams, filter="data")


def member_path(name: str) -> tuple[str, str]:
    """(top directory, the rest) of a tar member's normalised name; raises on an escape.

    ``output/./a//b`` is ``("output", "a/b")``; ``output/`` itself is ``("output", "")``.
    Absolute names, ``..`` anywhere, and top directories other than the two the guest
    writes are refused rather than skipped: only a tampered disk holds them.
    """
    if name.startswith("/"):
        raise tarfile.TarError(f"absolute member name {name!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise tarfile.TarError(f"member name {name!r} has a '..' component")
    if not parts or parts[0] not in ("output", "streams"):
        raise tarfile.TarError(f"member {name!r} is outside output/ and streams/")
    return parts[0], "/".join(parts[1:])
