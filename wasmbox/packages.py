"""Internal: ``policy.python.packages`` on every tier, what a listed entry holds, safely.

Each entry of ``policy.python.packages`` is a directory (``pip install --target DIR ...``, or
one package directory holding ``__init__.py``) or a ``.whl``. Every tier uses them read-only:

* the wasm tier mounts them as preopens under ``/python/N``; it runs pure-Python code only,
  so a task importing a listed package that holds C extensions is refused there
  (`wasm_refusal`: ``unsuitable`` under ``tier="auto"``, which then moves the task on);
* the container and VM tiers bind them read-only at ``/opt/wasmbox/packages/N``
  (`wasmbox.runner.PACKAGES_MOUNT`) and pass each to the runner with ``--path``
  (`wasmbox.runner.package_args`), so C extensions built for the sandbox's ``python3`` load.

The listed paths are host configuration, but their *contents* are treated as hostile all the
same: the host never follows a symlink while looking at them, never recurses (the walk is an
explicit stack), and bounds the walk in entries (`MAX_ENTRIES`) and depth (`MAX_DEPTH`). A
symlink that resolves outside its directory is refused (`ConfigError`): the task would see
something other than what was listed, and tiers would disagree about it. A wheel is unpacked
only after every member name is checked (no absolute path, no ``..``), within
`MAX_WHEEL_MEMBERS` and `MAX_WHEEL_BYTES`, into a directory named by its content hash.

Scans are cached per directory, keyed by the (device, inode, mtime) of the directory and of
each of its top-level entries: ``pip install --target`` replaces top-level package
directories, so a reinstall is seen; an edit deep inside a package is not, until its
top-level directory changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from wasmbox._fs import atomic_path
from wasmbox.errors import ConfigError

MAX_ENTRIES = 100_000  # files and directories under one listed directory
MAX_DEPTH = 32
MAX_WHEEL_MEMBERS = 100_000
MAX_WHEEL_BYTES = 2 << 30  # uncompressed, as the wheel declares it (zipfile enforces it)
_CACHE_SIZE = 256
EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib")
_CPYTHON_TAG = re.compile(r"\.cpython-(\d{2,4})[a-z]*[-.]")
GUEST_PYTHON = "/usr/bin/python3"  # the container's and VM's python3 (the host's, read-only)
_CHUNK = 1 << 20


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


def _top_name(name: str, is_dir: bool) -> str | None:
    """The importable top-level module an entry of a sys.path directory provides, or None."""
    if is_dir:
        return name if name.isidentifier() else None  # numpy.libs, *.dist-info: not modules
    stem = name.partition(".")[0]
    if name.endswith(".py") or is_extension(name):
        return stem if stem.isidentifier() else None
    return None


_lock = threading.Lock()
_scans: OrderedDict[str, tuple[object, PackageDir]] = OrderedDict()
_digests: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()


def describe(package: Path) -> PackageDir:
    """Scan one listed entry (a directory or a wheel), cached; `ConfigError` when it is
    missing, unsafe (a symlink out of it, a wheel member outside it) or over the bounds."""
    path = Path(package)
    if path.is_file() and path.suffix == ".whl":
        return _describe_wheel(path)
    if not path.is_dir():
        raise ConfigError(f"python.packages: {package} is not a directory or a .whl")
    root = Path(os.path.realpath(path))
    stamp = _stamp(root)
    key = str(root)
    with _lock:
        found = _scans.get(key)
        if found is not None and found[0] == stamp:
            _scans.move_to_end(key)
            return found[1]
    described = _scan(path, root)
    with _lock:
        _scans[key] = (stamp, described)
        while len(_scans) > _CACHE_SIZE:
            _scans.popitem(last=False)
    return described


def _stamp(root: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What the cache entry of `root` is valid for (see the module docstring)."""
    st = os.lstat(root)
    stamp = [("", st.st_dev, st.st_ino, st.st_mtime_ns)]
    try:
        with os.scandir(root) as it:
            for count, entry in enumerate(it):
                if count >= MAX_ENTRIES:
                    break  # _scan reports the bound
                s = entry.stat(follow_symlinks=False)
                stamp.append((entry.name, s.st_dev, s.st_ino, s.st_mtime_ns))
    except OSError as exc:
        raise ConfigError(f"python.packages: cannot read {root}: {exc}") from exc
    return tuple(sorted(stamp))


def _scan(listed: Path, root: Path) -> PackageDir:
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
                    if seen > MAX_ENTRIES:
                        raise ConfigError(f"python.packages: {listed} holds over {MAX_ENTRIES} "
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
                        name = _top_name(entry.name, is_dir)
                        if name is not None:
                            extensions.setdefault(name, [])
                    if is_dir:
                        if depth + 1 > MAX_DEPTH:
                            raise ConfigError(f"python.packages: {entry.path} is nested over "
                                              f"{MAX_DEPTH} directories deep")
                        stack.append((entry.path, depth + 1, name))
                    elif name is not None and is_extension(entry.name):
                        _note(entry.path[len(prefix):], entry.name, extensions[name],
                              tags.setdefault(name, set()))
        except OSError as exc:
            raise ConfigError(f"python.packages: cannot read {directory}: {exc}") from exc
    return PackageDir(listed, root, {n: tuple(v) for n, v in extensions.items()},
                      {n: frozenset(v) for n, v in tags.items() if v})


def _note(path: str, name: str, found: list[str], tags: set[str]) -> None:
    """Record one extension file: the first few paths, and every CPython tag."""
    if len(found) < 3:
        found.append(path)
    tag = _CPYTHON_TAG.search(name)
    if tag is not None:
        tags.add(tag.group(1))


def _describe_wheel(wheel: Path) -> PackageDir:
    extensions: dict[str, list[str]] = {}
    tags: dict[str, set[str]] = {}
    for name in _wheel_members(wheel):
        parts = name.split("/")
        is_dir = len(parts) > 1
        top = _top_name(parts[0], is_dir)
        if top is None:
            continue
        found = extensions.setdefault(top, [])
        if is_extension(parts[-1]):
            _note(name, parts[-1], found, tags.setdefault(top, set()))
    return PackageDir(wheel, wheel, {n: tuple(v) for n, v in extensions.items()},
                      {n: frozenset(v) for n, v in tags.items() if v})


def _wheel_members(wheel: Path) -> list[str]:
    """The wheel's member names, each checked; `ConfigError` for an unsafe or huge wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"python.packages: cannot read {wheel}: {exc}") from exc
    if len(infos) > MAX_WHEEL_MEMBERS:
        raise ConfigError(f"python.packages: {wheel} has over {MAX_WHEEL_MEMBERS} members")
    if sum(info.file_size for info in infos) > MAX_WHEEL_BYTES:
        raise ConfigError(f"python.packages: {wheel} unpacks to over {MAX_WHEEL_BYTES} bytes")
    for info in infos:
        name = info.filename
        if name.startswith("/") or "\\" in name or ".." in name.split("/") or "\0" in name:
            raise ConfigError(f"python.packages: {wheel} has an unsafe path {name!r}")
    return [info.filename for info in infos if not info.is_dir()]


def unpack_wheel(wheel: Path, root: Path) -> Path:
    """The wheel unpacked under `root` in a directory named by its content hash (reused when
    present); members are checked first, and the tree is left readable by everyone (the
    container's uid reads it) and writable by no one but its owner."""
    digest = _digest(wheel)
    target = root / digest
    if target.is_dir():
        return target
    _wheel_members(wheel)
    try:
        with atomic_path(target, directory=True) as tmp, zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
            _normalise_modes(tmp)
    except OSError as exc:
        if target.is_dir():
            return target  # another process unpacked it first (the rename met a full dir)
        raise ConfigError(f"python.packages: cannot unpack {wheel}: {exc}") from exc
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"python.packages: cannot unpack {wheel}: {exc}") from exc
    return target


def _normalise_modes(top: Path) -> None:
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


def _digest(wheel: Path) -> str:
    st = os.stat(wheel)
    key = (str(wheel), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        found = _digests.get(key)
    if found is not None:
        return found
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()[:24]
    with _lock:
        _digests[key] = digest
        while len(_digests) > _CACHE_SIZE:
            _digests.popitem(last=False)
    return digest


def default_wheel_dir() -> Path:
    """Where the container and VM tiers unpack wheels: ``$WASMBOX_CACHE_DIR/wheels`` or
    ``~/.cache/wasmbox/wheels``."""
    env = os.environ.get("WASMBOX_CACHE_DIR")
    if env:
        return Path(env) / "wheels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wasmbox" / "wheels"


def host_dirs(packages: tuple[Path, ...], wheel_dir: Path | None = None) -> tuple[str, ...]:
    """The host directory to mount for each listed entry, in order (wheels unpacked into
    `wheel_dir`, default `default_wheel_dir`); every entry is checked by `describe`."""
    found: list[str] = []
    for package in packages:
        described = describe(package)
        if Path(package).is_file():  # a wheel: describe() accepts nothing else that is a file
            found.append(str(unpack_wheel(Path(package), wheel_dir or default_wheel_dir())))
        else:
            found.append(str(described.root))
    return tuple(found)


def wasm_refusal(packages: tuple[Path, ...], imported: frozenset[str] | None) -> str | None:
    """Why the wasm tier cannot run a task importing `imported` (top-level names, as
    `source_scan.imported_modules` finds them) with these packages, or None.

    The first listed entry providing a name is the one imported (sys.path order); a name it
    provides with C extensions cannot load in WASI.
    """
    if not imported:
        for package in packages:
            describe(package)  # still refuse unsafe entries on every tier
        return None
    remaining = set(imported)
    for package in packages:
        described = describe(package)
        provided = remaining & described.extensions.keys()
        compiled = described.with_extensions(provided)
        if compiled:
            name, files = next(iter(compiled.items()))
            return (f"{name} (python.packages {package}) has C extensions ({files[0]}): the "
                    "wasm tier runs pure-Python packages only; use tier='container' (or "
                    "tier='auto')")
        remaining -= provided
    return None


def guest_cpython() -> str | None:
    """The CPython version tag ("311") of the sandbox's python3, from the name it links to
    (``/usr/bin/python3 -> python3.11``); None when that cannot tell."""
    match = re.fullmatch(r"python(\d)\.(\d+)", os.path.basename(os.path.realpath(GUEST_PYTHON)))
    return None if match is None else match.group(1) + match.group(2)


def abi_refusal(packages: tuple[Path, ...], imported: frozenset[str] | None,
                guest: str | None) -> str | None:
    """Why an imported listed package cannot load in the sandbox's python3 (CPython `guest`,
    e.g. "311"): its C extensions are all tagged for another CPython. None when they fit, are
    untagged (``abi3``), or nothing says."""
    if not imported or guest is None:
        return None
    remaining = set(imported)
    for package in packages:
        described = describe(package)
        provided = remaining & described.extensions.keys()
        for name in sorted(provided):
            built = described.cpython.get(name)
            if built and guest not in built:
                versions = ", ".join(f"{v[0]}.{v[1:]}" for v in sorted(built))
                return (f"{name} (python.packages {package}) is built for CPython {versions}, "
                        f"but the sandbox's python3 is {guest[0]}.{guest[1:]}: install it with "
                        f"`{GUEST_PYTHON} -m pip install --target` (or pip's "
                        f"--python-version {guest[0]}.{guest[1:]})")
        remaining -= provided
    return None


def sandbox_dirs(packages: tuple[Path, ...], imported: frozenset[str] | None,
                 wheel_dir: Path | None = None) -> tuple[str, ...]:
    """For the container and VM tiers: `host_dirs`, after refusing (`ConfigError`) a package
    the task imports whose C extensions are built for another CPython than `GUEST_PYTHON`."""
    found = host_dirs(packages, wheel_dir)
    refused = abi_refusal(packages, imported, guest_cpython())
    if refused is not None:
        raise ConfigError(f"python.packages: {refused}")
    return found


def clear_cache() -> None:
    """Forget every scan and wheel digest (tests, or after editing packages in place)."""
    with _lock:
        _scans.clear()
        _digests.clear()
