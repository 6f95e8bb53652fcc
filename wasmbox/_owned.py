"""Directories wasmbox owns on the host: one naming rule, one reclaim, one removal.

Every directory wasmbox makes for a run or a tier (workspaces, container staging and root
skeletons, VM run directories) is named ``<prefix><owner pid>-...``, so what a killed process
left behind can be told from what a live one uses, and removed by `reclaim_owned`.
`remove_tree` removes whatever a guest or a local user left inside, without following links.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasmbox.lifecycle import process_alive

log = logging.getLogger("wasmbox")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_owned_dir(root: str, prefix: str) -> str:
    """A new private directory under `root`, named for its owner so leftovers can be reclaimed.

    Cheaper than tempfile.mkdtemp: a counter plus a random token, created exclusively (an
    existing name, even a planted symlink, makes mkdir fail and the next name is tried).
    """
    for _ in range(100):
        path = f"{root}/{prefix}{os.getpid()}-{next(_COUNTER)}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free {prefix}* name under {root}")


_COUNTER = itertools.count()


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid that owns `name` (made under `prefix`), or None if it is not such a name."""
    if not name.startswith(prefix):
        return None
    owner = name[len(prefix):].split("-", 1)[0]
    return int(owner) if owner.isdigit() else None


def reclaim_owned(root: str | Path, prefix: str, *,
                  before: Callable[[str], None] | None = None) -> list[str]:
    """Remove what dead owners left under `root` with `prefix`; returns the removed paths.

    `before` runs first on each real directory (a VM run dir: kill its QEMU). Never raises:
    what cannot be listed or removed (a tree planted by someone else, a permission) is
    logged and left, so starting a tier never depends on what is in the root.
    """
    reclaimed: list[str] = []
    try:
        with os.scandir(root) as it:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    except OSError as exc:
        log.warning("cannot list %s to reclaim what dead processes left: %s", root, exc)
        return reclaimed
    for name, is_dir in entries:
        owner = owner_pid(name, prefix)
        if owner is None or process_alive(owner):
            continue
        path = os.path.join(root, name)
        try:
            if before is not None and is_dir:
                before(path)
            remove_tree(path)
        except Exception:
            log.warning("cannot reclaim %s", path, exc_info=True)
            continue
        reclaimed.append(path)
    return reclaimed


def remove_owned(path: str, prefix: str) -> None:
    """Remove an owned directory quickly; never raises (a leftover is reclaimed later).

    Refuses (RuntimeError) a path whose name does not carry `prefix`: never delete what is
    not ours.
    """
    if not os.path.basename(path).startswith(prefix):
        raise RuntimeError(f"refusing to remove {path}: not a {prefix}* directory")
    try:
        try:
            clear_shallow(path, _SHALLOW)  # the usual few entries, cheaply
            os.rmdir(path)
        except (OSError, _TooDeep):
            remove_tree(path)  # the thorough way: any depth, locked dirs, links
    except Exception:  # cleanup never fails a run; a leftover is reclaimed after we exit
        log.warning("cannot remove %s", path, exc_info=True)


_SHALLOW = 4  # levels below the workspace the cheap removal goes: task/output/<2 levels>


class _TooDeep(Exception):
    pass


def clear_shallow(path: str, levels: int) -> None:
    """Empty `path` with path-based calls, at most `levels` deep (bounded recursion).

    About half the cost of `remove_tree` for a typical workspace; anything unusual (a
    deeper tree, a locked directory) raises and `remove_tree` finishes the job.
    """
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                if levels == 0:
                    raise _TooDeep
                clear_shallow(entry.path, levels - 1)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree whatever a guest or a local user left in it.

    Iterative and fd-relative: any depth (no recursion, no path-length limit), at most three
    fds open, symlinks removed and never followed, read-only or unreadable directories
    unlocked, entries that vanish meanwhile ignored. Climbing back up checks each parent is
    the directory it came down from, so a tree moved mid-removal stops the removal rather
    than redirecting it. A missing `path` is not an error; anything else raises `OSError`.
    """
    parent, name = os.path.split(os.fspath(path).rstrip("/"))
    parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_at(parent_fd, name)
    finally:
        os.close(parent_fd)


def _remove_at(parent_fd: int, name: str) -> None:
    try:
        fd = _open_dir(parent_fd, name)
    except FileNotFoundError:
        return
    except (NotADirectoryError, _SymlinkError):
        _unlink(parent_fd, name)
        return
    names = [name]  # from parent_fd down to fd's directory
    parents = [_identity(parent_fd)]  # the directory each of `names` sits in
    pending = [_clear_files(fd)]  # subdirectories left to remove, per level
    try:
        while True:
            if pending[-1]:
                sub = pending[-1].pop()
                try:
                    child = _open_dir(fd, sub)
                except FileNotFoundError:
                    continue
                except (NotADirectoryError, _SymlinkError):
                    _unlink(fd, sub)
                    continue
                parents.append(_identity(fd))
                names.append(sub)
                os.close(fd)
                fd = child
                pending.append(_clear_files(fd))
                continue
            pending.pop()
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(fd) != parents.pop():
                raise OSError(errno.ESTALE, "a directory moved while it was being removed")
            _rmdir(fd, names.pop())
            if not names:
                return
    finally:
        os.close(fd)


class _SymlinkError(Exception):
    pass


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open_dir(dir_fd: int, name: str) -> int:
    """An fd of directory `name` in `dir_fd`, made readable if a guest locked it."""
    for attempt in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _SymlinkError from None
            if exc.errno != errno.EACCES or attempt:
                raise
        # chmod through an O_PATH fd: never follows a symlink planted in the meantime.
        pfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
    raise AssertionError("unreachable")


def _clear_files(fd: int) -> list[str]:
    """Unlink everything but directories in `fd`'s directory; returns the directories."""
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    subdirs = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
            continue
        try:
            _unlink(fd, name)
        except IsADirectoryError:
            subdirs.append(name)
    return subdirs


def _unlink(dir_fd: int, name: str) -> None:
    _retry_unlocked(dir_fd, lambda: os.unlink(name, dir_fd=dir_fd))


def _rmdir(dir_fd: int, name: str) -> None:
    _retry_unlocked(dir_fd, lambda: os.rmdir(name, dir_fd=dir_fd))


def _retry_unlocked(dir_fd: int, remove: Any) -> None:
    try:
        remove()
    except FileNotFoundError:
        return
    except PermissionError:  # a read-only directory: unlock it and try once more
        os.fchmod(dir_fd, 0o700)
        try:
            remove()
        except FileNotFoundError:
            return
