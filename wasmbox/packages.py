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
top-level directory changes. The walk and the wheel checks themselves are in
`wasmbox._package_walk`; the limits, the caches and what the tiers ask are here.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

from wasmbox._fs import atomic_path
from wasmbox._package_walk import EXTENSION_SUFFIXES as EXTENSION_SUFFIXES
from wasmbox._package_walk import PackageDir as PackageDir
from wasmbox._package_walk import describe_wheel, normalise_modes, scan, wheel_members
from wasmbox._package_walk import is_extension as is_extension
from wasmbox._package_walk import stamp as walk_stamp
from wasmbox.errors import ConfigError

MAX_ENTRIES = 100_000  # files and directories under one listed directory
MAX_DEPTH = 32
MAX_WHEEL_MEMBERS = 100_000
MAX_WHEEL_BYTES = 2 << 30  # uncompressed, as the wheel declares it (zipfile enforces it)
_CACHE_SIZE = 256
GUEST_PYTHON = "/usr/bin/python3"  # the container's and VM's python3 (the host's, read-only)
_CHUNK = 1 << 20

_lock = threading.Lock()
_scans: OrderedDict[str, tuple[object, PackageDir]] = OrderedDict()
_digests: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()


def describe(package: Path) -> PackageDir:
    """Scan one listed entry (a directory or a wheel), cached; `ConfigError` when it is
    missing, unsafe (a symlink out of it, a wheel member outside it) or over the bounds."""
    path = Path(package)
    if path.is_file() and path.suffix == ".whl":
        return describe_wheel(path, MAX_WHEEL_MEMBERS, MAX_WHEEL_BYTES)
    if not path.is_dir():
        raise ConfigError(f"python.packages: {package} is not a directory or a .whl")
    root = Path(os.path.realpath(path))
    stamp = walk_stamp(root, MAX_ENTRIES)
    key = str(root)
    with _lock:
        found = _scans.get(key)
        if found is not None and found[0] == stamp:
            _scans.move_to_end(key)
            return found[1]
    described = scan(path, root, MAX_ENTRIES, MAX_DEPTH)
    with _lock:
        _scans[key] = (stamp, described)
        while len(_scans) > _CACHE_SIZE:
            _scans.popitem(last=False)
    return described


def unpack_wheel(wheel: Path, root: Path) -> Path:
    """The wheel unpacked under `root` in a directory named by its content hash (reused when
    present); members are checked first, and the tree is left readable by everyone (the
    container's uid reads it) and writable by no one but its owner."""
    digest = _digest(wheel)
    target = root / digest
    if target.is_dir():
        return target
    wheel_members(wheel, MAX_WHEEL_MEMBERS, MAX_WHEEL_BYTES)
    try:
        with atomic_path(target, directory=True) as tmp, zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
            normalise_modes(tmp)
    except OSError as exc:
        if target.is_dir():
            return target  # another process unpacked it first (the rename met a full dir)
        raise ConfigError(f"python.packages: cannot unpack {wheel}: {exc}") from exc
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"python.packages: cannot unpack {wheel}: {exc}") from exc
    return target


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
