"""The guest's init script in pieces the host's busybox can run: reading a line from the task
port."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from wasmbox.tiers.vm.guest import GETLINE, INIT_SCRIPT

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_a_line_split_by_eof_is_read_whole(tmp_path: Path) -> None:
    # The host's line can reach the guest in pieces with an EOF between them: busybox's
    # `read` then fails yet keeps the first piece, which `read ... || sleep` took as the line.
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    script = GETLINE + f'exec 3<"{fifo}"\ngetline\necho "[$line]"\ngetline\necho "[$line]"\n'
    assert BUSYBOX is not None
    shell = subprocess.Popen([BUSYBOX, "sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for piece in (b"12 3", b"4\n\n", b"56\n"):  # an empty line is skipped, as before
            _write_when_read(fifo, piece, shell)
            time.sleep(0.2)  # the reader sees EOF before the next piece
        out, _ = shell.communicate(timeout=10)
    finally:
        shell.kill()
        shell.wait()
    assert out.splitlines() == ["[12 34]", "[56]"]


def _write_when_read(fifo: Path, data: bytes, reader: subprocess.Popen[str]) -> None:
    """Write `data` once `reader` has the fifo open; nothing once it exited."""
    end = time.monotonic() + 10
    while reader.poll() is None and time.monotonic() < end:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.01)
            continue
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return


def test_both_lines_from_the_host_are_read_with_getline() -> None:
    assert "read -r seed" not in INIT_SCRIPT and "read -r size" not in INIT_SCRIPT
    assert INIT_SCRIPT.count("  getline\n") == 2
