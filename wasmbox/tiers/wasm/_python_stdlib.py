"""Internal: the interpreter's own standard library for Python tasks (wasm tier).

componentize-py embeds the CPython-for-WASI standard library its interpreter was built with;
`unpack_stdlib` finds it, decompresses it (bounded) and unpacks it read-only, once per cache,
and `stdlib_modules` lists what a task can import from it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import tarfile
from pathlib import Path

import zstandard

from wasmbox._fs import atomic_path
from wasmbox.errors import HostFailure
from wasmbox.tiers.wasm._python_build import COMPONENTIZE_PY

# The standard library is mounted read-only where componentize-py had it at build time, so
# the `__path__` of every snapshotted package (``/python/json``, ...) is valid at run time too.
STDLIB_ROOT = "/python"
STDLIB_KEY = f"python-stdlib-{COMPONENTIZE_PY}"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_STDLIB_MARKERS = frozenset({"os.py", "encodings/__init__.py", "pathlib/__init__.py"})
_MAX_STDLIB_BYTES = 64 << 20


def unpack_stdlib(target: Path) -> None:
    """Unpack the CPython-for-WASI standard library componentize-py embeds into `target`.

    componentize-py carries it as a zstd-compressed tar inside its extension module (the
    exact files its interpreter was built with); it is found by its content, decompressed
    with `zstandard` (bounded in size), and unpacked without links or special files,
    read-only. Raises `HostFailure` when it cannot be found.
    """
    spec = importlib.util.find_spec("componentize_py")
    if spec is None or spec.origin is None:
        raise HostFailure("componentize-py is not installed")
    data = b"".join(p.read_bytes() for p in sorted(Path(spec.origin).parent.glob("*.so")))
    for match in re.finditer(re.escape(_ZSTD_MAGIC), data):
        tar = _decompress(data[match.start():])
        if tar is not None and _is_stdlib(tar):
            _extract(tar, target)
            return
    raise HostFailure("the standard library is not inside the installed componentize-py")


# Top-level modules of the mounted standard library that cannot import in this tier:
# the guest refuses sockets, subprocesses and ctypes (python_app.app._REFUSED), some modules
# import one of those, and some need a C module CPython-for-WASI does not build.
REFUSED_STDLIB = frozenset({
    # refused by the guest
    "socket", "select", "selectors", "ssl", "ctypes", "subprocess", "multiprocessing",
    # import a refused module
    "asyncio", "ftplib", "imaplib", "poplib", "smtplib", "socketserver", "mailbox", "pdb",
    "doctest", "ensurepip", "venv", "webbrowser", "antigravity", "pty",
    # need a C module the WASI build lacks (_bz2, _lzma, _curses, termios, _tkinter)
    "bz2", "lzma", "curses", "tty", "tkinter", "turtle", "turtledemo", "idlelib",
})


def stdlib_modules(stdlib: Path) -> frozenset[str]:
    """Top-level module names of an unpacked standard library (minus `REFUSED_STDLIB`)."""
    names: set[str] = set()
    for entry in stdlib.iterdir():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return frozenset(names - REFUSED_STDLIB)


def _decompress(data: bytes) -> bytes | None:
    """One zstd frame from the start of `data`, or None when it is not one (a stray magic
    number). The output is bounded, so no input can make the host inflate without end."""
    out = io.BytesIO()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data[:_MAX_STDLIB_BYTES]), read_across_frames=False)
        with reader:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
                if out.tell() > _MAX_STDLIB_BYTES:
                    return None
    except zstandard.ZstdError:
        pass  # the bytes after the frame are not another frame: what decoded is the frame
    return out.getvalue() if out.tell() >= 512 else None


def _is_stdlib(tar: bytes) -> bool:
    if tar[257:262] != b"ustar":
        return False
    try:
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            return set(tf.getnames()) >= _STDLIB_MARKERS
    except (tarfile.TarError, OSError):
        return False


def _extract(tar: bytes, target: Path) -> None:
    with atomic_path(target, directory=True) as tmp, tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = [m for m in tf.getmembers()
                   if (m.isfile() or m.isdir()) and not m.name.startswith("config-")]
        tf.extractall(tmp, members=members, filter="data")
        for root, _dirs, files in os.walk(tmp):  # the guest's mount is read-only anyway
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
