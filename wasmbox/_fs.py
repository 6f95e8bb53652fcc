"""Internal: atomic replacement of files and directories on the host.

Readers (other threads, other processes sharing a cache) see the old file or directory or
the new one, never a half-written one: the new one is made under a temporary name beside
the target, in the same directory (so on the same filesystem), and renamed over it only once
it is complete. Whatever fails or is interrupted on the way leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """A fresh temporary file (or, with `directory`, an empty directory) beside `target`.

    Fill it inside the ``with``; when the block ends without an exception it is renamed over
    `target` (a directory only replaces a missing or empty one), otherwise it is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
