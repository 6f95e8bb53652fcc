"""The host side of the output disk: a hostile guest's tar cannot plant links or escape."""

from __future__ import annotations

import io
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
    plan = apply(Policy(), Task.command(["true"], tier="vm"))
    with Workspace(plan, tmp_path) as ws:
        yield ws


def _disk(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    image = tmp_path / "out.img"
    image.write_bytes(buf.getvalue() + b"\0" * (1 << 16))  # a disk is larger than its tar
    return image


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_files_and_streams_land_in_place(tmp_path: Path, workspace: Workspace) -> None:
    image = _disk(tmp_path, [(_member("output/r.txt"), b"ok"),
                             (_member("streams/stdout"), b"out")])
    _unpack(image, workspace, workspace.plan)
    assert Path(workspace.output_dir, "r.txt").read_bytes() == b"ok"
    assert Path(workspace.stdout_path).read_bytes() == b"out"


def test_links_are_dropped(tmp_path: Path, workspace: Workspace) -> None:
    image = _disk(tmp_path, [(_member("output/s", tarfile.SYMTYPE, "/etc/passwd"), b""),
                             (_member("output/h", tarfile.LNKTYPE, "streams/stdout"), b"")])
    _unpack(image, workspace, workspace.plan)
    assert os.listdir(workspace.output_dir) == []


def test_path_escape_is_refused(tmp_path: Path, workspace: Workspace) -> None:
    image = _disk(tmp_path, [(_member("output/../../escape"), b"x")])
    with pytest.raises(tarfile.TarError):
        _unpack(image, workspace, workspace.plan)
    assert not (tmp_path / "escape").exists()


def test_sizes_beyond_the_disk_are_refused(tmp_path: Path, workspace: Workspace) -> None:
    image = _disk(tmp_path, [(_member("output/big"), b"x")])
    raw = bytearray(image.read_bytes())
    raw[124:136] = b"%011o\0" % (1 << 33)  # the size field claims 8 GiB
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    image.write_bytes(bytes(raw))
    with pytest.raises(tarfile.TarError):
        _unpack(image, workspace, workspace.plan)


def test_names_are_normalised_not_refused(tmp_path: Path, workspace: Workspace) -> None:
    # busybox tar lists the directories themselves; "." and doubled slashes are harmless.
    image = _disk(tmp_path, [(_member("output/", tarfile.DIRTYPE), b""),
                             (_member("output/./a//b.txt"), b"ab"),
                             (_member("streams/", tarfile.DIRTYPE), b""),
                             (_member("./streams/stderr"), b"err")])
    _unpack(image, workspace, workspace.plan)
    assert Path(workspace.output_dir, "a", "b.txt").read_bytes() == b"ab"
    assert Path(workspace.stderr_path).read_bytes() == b"err"
    assert sorted(os.listdir(workspace.task_dir)) == ["input.json", "output"]
