"""A writer for the ``newc`` cpio format, the one the Linux initramfs unpacker reads.

Concatenated archives are legal initramfs: the kernel unpacks them in order, later entries
overriding earlier ones, which is how a per-task archive is appended to the base image.
"""

from __future__ import annotations

import stat

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Builds an archive in memory; `finish()` returns the bytes, trailer included."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1000
        self._size = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (parents must be added first)."""
        self._entry(name, stat.S_IFDIR | mode, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link pointing at `target`."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, mode: int, major: int, minor: int) -> None:
        """Add a character device node (the console must exist before devtmpfs is mounted)."""
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive, trailer included, padded to 512 bytes."""
        self._entry(_TRAILER, 0, b"", count=False)
        out = b"".join(self._parts)
        return out + b"\0" * (-len(out) % 512)

    def _entry(self, name: str, mode: int, data: bytes, *, rdev: tuple[int, int] = (0, 0),
               count: bool = True) -> None:
        name = name.lstrip("/")
        if not name:
            raise ValueError("cpio entry needs a name")
        raw_name = name.encode() + b"\0"
        self._ino += 1 if count else 0
        fields = (
            self._ino if count else 0, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0,
            len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0,
        )
        header = _MAGIC + b"".join(b"%08x" % f for f in fields)
        chunk = header + raw_name
        chunk += b"\0" * (-len(chunk) % 4)
        chunk += data + b"\0" * (-len(data) % 4)
        self._parts.append(chunk)
