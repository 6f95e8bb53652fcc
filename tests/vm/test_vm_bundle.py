"""The guest side of a task's bundle: the seed helper unpacks only what the host may send.

The helper is the guest's own source, compiled with the host's C compiler and run in its
unpack-only mode (``-u ROOT``) against a temporary root: arming it here would credit entropy
to the host's RNG and set the host's clock.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from wasmbox.tiers.vm.guest import Bundle
from wasmbox.tiers.vm.guest_helpers import SEED_HELPER

REFUSED = 3


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("helper")
    (tmp / "wbx-seed.c").write_text(SEED_HELPER)
    built = subprocess.run([cc, "-static", "-Os", "-o", str(tmp / "wbx-seed"),
                            str(tmp / "wbx-seed.c")], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"the helper does not build here: {built.stderr[-300:]}")
    return tmp / "wbx-seed"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    """A ustar of (name, type, data) members; links point at /etc."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, 0o644
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _framed(tar: bytes) -> bytes:
    return b"%d\n" % len(tar) + tar


def _unpack(helper: Path, root: Path, data: bytes) -> int:
    return subprocess.run([str(helper), "-u", str(root)], input=data, timeout=30).returncode


def test_the_hosts_bundle_unpacks_with_its_modes(helper: Path, root: Path) -> None:
    bundle = Bundle({"task/input.json": (b'{"n": 1}', 0o644), "job/job.sh": (b"X=1\n", 0o700),
                     "task/sub/big": (b"z" * 70000, 0o600)},
                    ("job", "task", "task/sub"), "nonce")
    assert _unpack(helper, root, bundle.as_tar()) == 0
    assert (root / "task/input.json").read_bytes() == b'{"n": 1}'
    assert (root / "task/sub/big").read_bytes() == b"z" * 70000
    assert (root / "job/job.sh").stat().st_mode & 0o777 == 0o700
    assert (root / "task/sub/big").stat().st_mode & 0o777 == 0o600


def test_the_bundle_is_read_to_its_length_without_waiting_for_eof(
        helper: Path, root: Path) -> None:
    # QEMU's socket chardev may drop what a host that hung up left unread: the host keeps
    # the channel open, so the helper must stop at the announced length.
    data = _framed(_tar([("task", tarfile.DIRTYPE, b""), ("task/a", tarfile.REGTYPE, b"a")]))
    proc = subprocess.Popen([str(helper), "-u", str(root)], stdin=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    assert (root / "task/a").read_bytes() == b"a"


def test_a_length_line_split_by_eof_is_read_whole(
        helper: Path, root: Path, tmp_path: Path) -> None:
    # The port reads EOF while the host is not connected; the helper waits for more.
    data = _framed(_tar([("task", tarfile.DIRTYPE, b""), ("task/a", tarfile.REGTYPE, b"a")]))
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    port = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: reads see EOF
    os.set_blocking(port, True)
    try:
        proc = subprocess.Popen([str(helper), "-u", str(root)], stdin=port)
    finally:
        os.close(port)
    try:
        for piece in (data[:1], data[1:]):
            time.sleep(0.2)  # the helper reads EOF before each piece
            with open(fifo, "wb", buffering=0) as writer:
                writer.write(piece)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert (root / "task/a").read_bytes() == b"a"


@pytest.mark.parametrize("name", ["task/../escape", "task/../../escape", "job/./../escape"])
def test_dot_dot_is_refused(helper: Path, root: Path, name: str) -> None:
    # task/../escape stays under the root, yet outside the task's directories.
    data = _framed(_tar([("task", tarfile.DIRTYPE, b""), ("job", tarfile.DIRTYPE, b""),
                         (name, tarfile.REGTYPE, b"x")]))
    assert _unpack(helper, root, data) == REFUSED
    assert not (root.parent / "escape").exists()
    assert not (root / "escape").exists()


def test_an_absolute_name_is_refused(helper: Path, root: Path) -> None:
    target = root.parent / "escape"
    data = _framed(_tar([(str(target), tarfile.REGTYPE, b"x")]))
    assert _unpack(helper, root, data) == REFUSED
    assert not target.exists()


def test_names_outside_job_and_task_are_refused(helper: Path, root: Path) -> None:
    data = _framed(_tar([("etc", tarfile.DIRTYPE, b""), ("etc/passwd", tarfile.REGTYPE, b"x")]))
    assert _unpack(helper, root, data) == REFUSED
    assert not (root / "etc").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_links_and_specials_are_refused(helper: Path, root: Path, kind: bytes) -> None:
    data = _framed(_tar([("task", tarfile.DIRTYPE, b""), ("task/link", kind, b"")]))
    assert _unpack(helper, root, data) == REFUSED
    assert not os.path.lexists(root / "task/link")


def test_a_file_is_never_written_through_a_link(helper: Path, root: Path) -> None:
    outside = root.parent / "outside"
    outside.write_bytes(b"keep")
    (root / "task").mkdir()
    (root / "task/input.json").symlink_to(outside)
    data = _framed(_tar([("task/input.json", tarfile.REGTYPE, b"evil")]))
    assert _unpack(helper, root, data) == REFUSED
    assert outside.read_bytes() == b"keep"


def test_a_path_through_a_linked_directory_is_refused(helper: Path, root: Path) -> None:
    outside = root.parent / "outside"
    outside.mkdir()
    (root / "task").symlink_to(outside)
    data = _framed(_tar([("task/input.json", tarfile.REGTYPE, b"evil")]))
    assert _unpack(helper, root, data) == REFUSED
    assert os.listdir(outside) == []


def test_a_directory_entry_over_a_link_is_refused(helper: Path, root: Path) -> None:
    (root.parent / "outside").mkdir()
    (root / "job").symlink_to(root.parent / "outside")
    data = _framed(_tar([("job", tarfile.DIRTYPE, b"")]))
    assert _unpack(helper, root, data) == REFUSED


def test_a_size_past_the_announced_length_is_refused(helper: Path, root: Path) -> None:
    tar = _tar([("task", tarfile.DIRTYPE, b""), ("task/big", tarfile.REGTYPE, b"y" * 4096)])
    # The length says the archive ends inside the file's data.
    data = b"%d\n" % 2048 + tar[:2048]
    assert _unpack(helper, root, data) == REFUSED
    assert not (root / "task/big").exists()


def test_a_bad_checksum_is_refused(helper: Path, root: Path) -> None:
    tar = bytearray(_tar([("task", tarfile.DIRTYPE, b"")]))
    tar[0:4] = b"job\0"  # the name changes, the checksum does not
    assert _unpack(helper, root, _framed(bytes(tar))) == REFUSED
    assert os.listdir(root) == []


@pytest.mark.parametrize("line", [b"-1\n", b"12x\n", b"99999999999999999999\n"])
def test_a_bad_length_line_is_refused(helper: Path, root: Path, line: bytes) -> None:
    assert _unpack(helper, root, line) == REFUSED
    assert os.listdir(root) == []
