"""Threat: a hostile VM guest crafts its output disk to write outside ``/task/output``.

The output disk is a tar the guest writes; a task that became root in its guest controls
every byte of it. The host must extract only what lies under ``output/`` (and the two
streams) after normalising each member name, so ``output/../input.json`` cannot overwrite the
workspace's input, plant a directory beside ``output/``, or reach anything else. No VM is
needed: the disks here are crafted tar bytes fed to the host-side extraction.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Task
from wasmbox.policy import apply
from wasmbox.tiers.vm.tier import _unpack
from wasmbox.workspace import Workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    plan = apply(Policy(), Task.command(["true"], tier="vm", input={"original": True}))
    with Workspace(plan, tmp_path) as ws:
        yield ws


def _disk(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    image = tmp_path / "out.img"
    image.write_bytes(buf.getvalue() + b"\0" * (1 << 16))
    return image


def _task_tree(workspace: Workspace) -> set[str]:
    """Every path under the workspace, relative to it."""
    found = set()
    for top, dirs, files in os.walk(workspace.path):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(top, name), workspace.path))
    return found


@pytest.mark.parametrize("name", [
    "output/../input.json",  # overwrite the task's input beside output/
    "output/./../input.json",
    "output//../input.json",
    "output/sub/../../input.json",
])
def test_dotdot_under_output_cannot_overwrite_the_input(
    tmp_path: Path, workspace: Workspace, name: str
) -> None:
    image = _disk(tmp_path, [("output/", b""), (name, b'{"planted": true}')])
    with pytest.raises(tarfile.TarError, match=r"\.\."):
        _unpack(image, workspace, workspace.plan)
    assert json.loads(Path(workspace.input_path).read_bytes()) == {"original": True}


@pytest.mark.parametrize("name", [
    "output/../planted/x",  # a directory beside output/
    "output/../output2/x",
    "/output/x",  # absolute
    "task/input.json",  # not under output/ at all
    "input.json",
])
def test_nothing_lands_outside_the_output_directory(
    tmp_path: Path, workspace: Workspace, name: str
) -> None:
    before = _task_tree(workspace)
    image = _disk(tmp_path, [("output/", b""), ("output/ok", b"1"), (name, b"x")])
    with pytest.raises(tarfile.TarError):
        _unpack(image, workspace, workspace.plan)
    assert _task_tree(workspace) == before  # refused before anything is written
    assert not (tmp_path / "x").exists()
