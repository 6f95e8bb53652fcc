"""Internal: what one listed ``python.packages`` entry holds, read safely.

A directory is walked with an explicit stack (no recursion), never following a symlink, and
a wheel's member names are checked before anything is unpacked. The bounds are the caller's
(`wasmbox.packages`, which documents them and keeps the scan caches), passed on each call.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from wasmbox.errors import ConfigError

EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib")
_CPYTHON_TAG = re.compile(r"\.cpython-(\d{2,4})[a-z]*[-.]")


@dataclass(frozen=True, slots=True)
class PackageDir:
    """What one listed entry holds: importable top-level names and their C extensions.

    `extensions` maps each top-level name to the first few extension files found under it
    (paths relative to `root`); pure-Python names map to an empty tuple.
    """

    source: Path  # as listed in the policy
    root: Path  # the directory (a wheel: its member names, relative to the unpack root)
    extensions: dict[str, tuple[str, ...]]
    # CPython versions ("311") the extensions of each name are tagged for (``.cpython-311-``);
    # untagged and ``abi3`` extensions add none.
    cpython: dict[str, frozenset[str]] = field(default_factory=dict)

    def with_extensions(self, names: frozenset[str] | set[str]) -> dict[str, tuple[str, ...]]:
        """The names among `names` this entry provides that hold C extensions."""
        return {n: self.extensions[n] for n in sorted(names)
                if self.extensions.get(n)}


def is_extension(name: str) -> bool:
    """Whether a file name is a compiled module or shared library."""
    return name.endswith(EXTENSION_SUFFIXES) or ".so." in name


def top_name(name: str, is_dir: bool) -> str | None:
    """The importable top-level module an entry of a sys.path directory provides, or None."""
    if is_dir:
        return name if name.isidentifier() else None  # numpy.libs, *.dist-info: not modules
    stem = name.partition(".")[0]
    if name.endswith(".py") or is_extension(name):
        return stem if stem.isidentifier() else None
    return None


def stamp(root: Path, max_entries: int) -> tuple[tuple[str, int, int, int], ...]:
    """What the cache entry of `root` is valid for (see `wasmbox.packages`)."""
    st = os.lstat(root)
    stamp = [("", st.st_dev, st.st_ino, st.st_mtime_ns)]
    try:
        with os.scandir(root) as it:
            for count, entry in enumerate(it):
                if count >= max_entries:
                    break  # scan reports the bound
                s = entry.stat(follow_symlinks=False)
                stamp.append((entry.name, s.st_dev, s.st_ino, s.st_mtime_ns))
    except OSError as exc:
        raise ConfigError(f"python.packages: cannot read {root}: {exc}") from exc
    return tuple(sorted(stamp))


def scan(listed: Path, root: Path, max_entries: int, max_depth: int) -> PackageDir:
    """Walk `root` without recursion or following symlinks; bounded."""
    single = (root / "__init__.py").is_file()  # the directory is one package itself
    extensions: dict[str, list[str]] = {root.name: []} if single else {}
    tags: dict[str, set[str]] = {}
    # (directory, depth, the top-level name it belongs to; None at the root of a path dir)
    stack: list[tuple[str, int, str | None]] = [(str(root), 0, root.name if single else None)]
    seen = 0
    prefix = str(root).rstrip("/") + "/"
    while stack:
        directory, depth, top = stack.pop()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    seen += 1
                    if seen > max_entries:
                        raise ConfigError(f"python.packages: {listed} holds over {max_entries} "
                                          "files: list the packages' own directory instead")
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not (target + "/").startswith(prefix):
                            raise ConfigError(f"python.packages: {entry.path} is a symlink to "
                                              f"{target}, outside {listed}")
                        continue  # its target, inside, is scanned as itself
                    is_dir = entry.is_dir(follow_symlinks=False)
                    name = top
                    if depth == 0 and not single:
                        name = top_name(entry.name, is_dir)
                        if name is not None:
                            extensions.setdefault(name, [])
                    if is_dir:
                        if depth + 1 > max_depth:
                            raise ConfigError(f"python.packages: {entry.path} is nested over "
                                              f"{max_depth} directories deep")
                        stack.append((entry.path, depth + 1, name))
                    elif name is not None and is_extension(entry.name):
                        note(entry.path[len(prefix):], entry.name, extensions[name],
                              tags.setdefault(name, set()))
        except OSError as exc:
            raise ConfigError(f"python.packages: cannot read {directory}: {exc}") from exc
    return PackageDir(listed, root, {n: tuple(v) for n, v in extensions.items()},
                      {n: frozenset(v) for n, v in tags.items() if v})


def note(path: str, name: str, found: list[str], tags: set[str]) -> None:
    """Record one extension file: the first few paths, and every CPython tag."""
    if len(found) < 3:
        found.append(path)
    tag = _CPYTHON_TAG.search(name)
    if tag is not None:
        tags.add(tag.group(1))


def describe_wheel(wheel: Path, max_members: int, max_bytes: int) -> PackageDir:
    extensions: dict[str, list[str]] = {}
    tags: dict[str, set[str]] = {}
    for name in wheel_members(wheel, max_members, max_bytes):
        parts = name.split("/")
        is_dir = len(parts) > 1
        top = top_name(parts[0], is_dir)
        if top is None:
            continue
        found = extensions.setdefault(top, [])
        if is_extension(parts[-1]):
            note(name, parts[-1], found, tags.setdefault(top, set()))
    return PackageDir(wheel, wheel, {n: tuple(v) for n, v in extensions.items()},
                      {n: frozenset(v) for n, v in tags.items() if v})


def wheel_members(wheel: Path, max_members: int, max_bytes: int) -> list[str]:
    """The wheel's member names, each checked; `ConfigError` for an unsafe or huge wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"python.packages: cannot read {wheel}: {exc}") from exc
    if len(infos) > max_members:
        raise ConfigError(f"python.packages: {wheel} has over {max_members} members")
    if sum(info.file_size for info in infos) > max_bytes:
        raise ConfigError(f"python.packages: {wheel} unpacks to over {max_bytes} bytes")
    for info in infos:
        name = info.filename
        if name.startswith("/") or "\\" in name or ".." in name.split("/") or "\0" in name:
            raise ConfigError(f"python.packages: {wheel} has an unsafe path {name!r}")
    return [info.filename for info in infos if not info.is_dir()]


def normalise_modes(top: Path) -> None:
    os.chmod(top, 0o755)
    stack = [str(top)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    os.chmod(entry.path, 0o755)
                    stack.append(entry.path)
                elif stat.S_ISREG(mode):
                    os.chmod(entry.path, 0o755 if mode & 0o100 else 0o644)
