"""The per-run host directory: input staged read-only, outputs collected under caps.

Layout on the host (``<root>/wasmbox-XXXX/``)::

    task/             guest /task          (read-only to the guest)
    task/input.json   guest /task/input.json
    task/output/      guest /task/output   (the only writable place)

Collection never follows a symlink, refuses special files and hard links, and stops at the
first cap that trips: the reason becomes the run's OUTPUT_REJECTED status.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from wasmbox.errors import InputRejected
from wasmbox.lifecycle import Closeable, process_alive
from wasmbox.models import DenyAction, MiB, OutputPolicy
from wasmbox.policy import Plan

PREFIX = "wasmbox-"
RESULT_FILE = "result.json"
REDACTED = b"[REDACTED]"


def workspace_root() -> Path:
    """Where workspaces live: ``$WASMBOX_TMPDIR``, else ``/dev/shm``, else the temp dir.

    A memory-backed directory makes staging and removal several times cheaper than a disk;
    outputs are capped while the guest runs, so it cannot fill memory.
    """
    env = os.environ.get("WASMBOX_TMPDIR")
    if env:
        return Path(env)
    if os.access(_SHM, os.W_OK | os.X_OK):
        return Path(_SHM)
    return Path(tempfile.gettempdir())


_SHM = "/dev/shm"


def _make_dir(root: str) -> str:
    """A new private directory under `root`, named for its owner so leftovers can be reclaimed.

    Cheaper than tempfile.mkdtemp: a counter plus a random token, created exclusively (an
    existing name, even a planted symlink, makes mkdir fail and the next name is tried).
    """
    for _ in range(100):
        path = f"{root}/{PREFIX}{os.getpid()}-{next(_COUNTER)}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free workspace name under {root}")


_COUNTER = itertools.count()


def reclaim_stale(root: Path | None = None) -> list[str]:
    """Remove workspaces whose owning process is gone; returns their paths."""
    reclaimed: list[str] = []
    base = root or workspace_root()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return reclaimed
    for entry in entries:
        owner = entry.name[len(PREFIX):].split("-", 1)[0]
        if not entry.name.startswith(PREFIX) or not owner.isdigit() or process_alive(int(owner)):
            continue
        with contextlib.suppress(OSError):
            remove_tree(entry.path)
            reclaimed.append(entry.path)
    return reclaimed



def encode_input(plan: Plan) -> bytes:
    """The task input as JSON bytes, checked against the size cap and the input schema."""
    task = plan.task
    try:
        data = json.dumps(task.input, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"input is not JSON: {exc}") from exc
    if len(data) > plan.input_bytes:
        raise InputRejected(f"input is {len(data)} bytes, over the {plan.input_bytes} cap")
    if task.input_schema is not None:
        try:
            jsonschema.validate(task.input, task.input_schema)
        except jsonschema.ValidationError as exc:
            raise InputRejected(f"input fails its schema: {exc.message}") from exc
        except jsonschema.SchemaError as exc:
            raise InputRejected(f"input_schema is not a valid schema: {exc.message}") from exc
    return data


@dataclass
class Collected:
    """What a run left in /task/output, after caps and filters."""

    files: dict[str, bytes] = field(default_factory=dict)
    output: Any = None
    rejection: str | None = None
    total_bytes: int = 0


class Workspace(Closeable):
    """A fresh directory per run; `close()` removes it whatever the guest left inside."""

    def __init__(self, plan: Plan, root: Path | None = None) -> None:
        data = encode_input(plan)
        self.plan = plan
        # Plain strings, not Paths: pathlib costs tens of microseconds per run here.
        self.path = _make_dir(str(root or workspace_root()))
        try:
            self.task_dir = self.path + "/task"
            self.output_dir = self.task_dir + "/output"
            self.input_path = self.task_dir + "/input.json"
            # Host-only files (captured stdio) sit beside task/, never inside it.
            self.stdout_path = self.path + "/stdout"
            self.stderr_path = self.path + "/stderr"
            os.mkdir(self.task_dir)
            os.mkdir(self.output_dir)
            fd = os.open(self.input_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except BaseException:
            self._remove()
            raise

    def _release(self) -> None:
        self._remove()

    def _remove(self) -> None:
        if not os.path.basename(self.path).startswith(PREFIX):  # never delete what is not ours
            raise RuntimeError(f"refusing to remove {self.path}: not a workspace")
        try:
            _clear_dir(self.path)
            os.rmdir(self.path)
        except OSError:
            remove_tree(self.path)  # the thorough way: permissions a guest changed, races

    def output_bytes(self) -> int:
        """Bytes in /task/output now (a monitoring sample, not a cap check)."""
        return sum(st.st_size for _, st in _entries(self.output_dir)
                   if not stat.S_ISDIR(st.st_mode))

    def stream_sizes(self) -> tuple[int, int]:
        """Bytes the guest has written to stdout and stderr so far."""
        return _size(self.stdout_path), _size(self.stderr_path)

    def read_stream(self, path: str, cap: int) -> tuple[bytes, bool]:
        """At most `cap` bytes of a captured stream, and whether there was more."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return b"", False
        try:
            chunks, size = [], 0
            while size <= cap and (chunk := os.read(fd, cap + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return data[:cap], len(data) > cap

    def over_cap(self) -> str | None:
        """A cheap check while the guest runs: the reason if its writes already break a cap.

        Streams are kept up to their cap (the rest is cut, with a truncation flag); a guest
        that keeps writing far past it is a flood and is stopped.
        """
        plan = self.plan
        for name, size, cap in zip(
            ("stdout", "stderr"), self.stream_sizes(), (plan.stdout_bytes, plan.stderr_bytes),
            strict=True,
        ):
            if size > flood_limit(cap):
                return f"{name} flood: over {flood_limit(cap)} bytes written"
        caps = plan.output
        total = 0
        for count, (name, st) in enumerate(_entries(self.output_dir), start=1):
            if count > caps.max_files:
                return f"more than {caps.max_files} output files"
            if stat.S_ISDIR(st.st_mode):
                continue
            total += st.st_size
            if st.st_size > caps.max_file_bytes:
                return f"{name} exceeds {caps.max_file_bytes} bytes"
            if total > caps.max_total_bytes:
                return f"outputs exceed {caps.max_total_bytes} bytes in total"
        return None

    def collect(self) -> Collected:
        """Read /task/output under the plan's caps, filters and output schema."""
        self._ensure_open()
        result = Collected()
        try:
            self._walk(self.output_dir, "", 0, result)
        except _Rejected as exc:
            return Collected(rejection=str(exc))
        result.rejection = _check_result(result, self.plan)
        return result

    def _walk(self, directory: str, prefix: str, depth: int, into: Collected) -> None:
        caps = self.plan.output
        if depth > caps.max_depth:
            raise _Rejected(f"output nests deeper than {caps.max_depth} directories")
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _Rejected(f"{rel} is a symlink")
            if stat.S_ISDIR(st.st_mode):
                self._walk(entry.path, rel + "/", depth + 1, into)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _Rejected(f"{rel} is not a regular file")
            if st.st_nlink > 1:
                raise _Rejected(f"{rel} is a hard link")
            if len(into.files) >= caps.max_files:
                raise _Rejected(f"more than {caps.max_files} output files")
            data = _read_capped(entry.path, caps.max_file_bytes, rel)
            into.total_bytes += len(data)
            if into.total_bytes > caps.max_total_bytes:
                raise _Rejected(f"outputs exceed {caps.max_total_bytes} bytes in total")
            into.files[rel] = filter_bytes(data, caps, rel)


def _entries(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Name and lstat of everything under `root` while a guest may be changing it: never
    follows a link, skips what vanishes or cannot be read."""
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            yield entry.name, st


class _Rejected(Exception):
    pass


def flood_limit(cap: int) -> int:
    """How far past its cap a stream may be written before the writer is stopped."""
    return 4 * cap + MiB


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _clear_dir(path: str) -> None:
    # shutil.rmtree's fd-based walk costs ~100 us even for a nearly empty tree.
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                _clear_dir(entry.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree that a guest may have left read-only or half-deleted."""

    def unlock(func: Any, failed: str, exc_info: Any) -> None:
        if isinstance(exc_info[1], FileNotFoundError):
            return
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    shutil.rmtree(path, onerror=unlock)


def _read_capped(path: str, cap: int, rel: str) -> bytes:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _Rejected(f"{rel} cannot be read safely: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Rejected(f"{rel} is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise _Rejected(f"{rel} exceeds {cap} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def filter_bytes(data: bytes, caps: OutputPolicy, where: str) -> bytes:
    """Apply the deny patterns: redact matches, or reject naming the pattern and place."""
    for pattern in _compiled(caps.deny_patterns):
        if caps.on_deny is DenyAction.REDACT:
            data = pattern.sub(REDACTED, data)
        elif pattern.search(data):
            raise _Rejected(f"deny pattern {pattern.pattern.decode()!r} matched in {where}")
    return data


def filter_stream(data: bytes, caps: OutputPolicy, where: str) -> tuple[bytes, str | None]:
    """`filter_bytes` for stdout/stderr: returns the (possibly redacted) bytes and a rejection."""
    if not caps.filter_streams or not caps.deny_patterns:
        return data, None
    try:
        return filter_bytes(data, caps, where), None
    except _Rejected as exc:
        return data, str(exc)


_PATTERN_CACHE: dict[tuple[str, ...], list[re.Pattern[bytes]]] = {}


def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern[bytes]]:
    if not patterns:
        return []
    found = _PATTERN_CACHE.get(patterns)
    if found is None:
        found = [re.compile(p.encode()) for p in patterns]
        _PATTERN_CACHE[patterns] = found
    return found


def _check_result(result: Collected, plan: Plan) -> str | None:
    schema = plan.task.output_schema
    raw = result.files.get(RESULT_FILE)
    if raw is None:
        return f"the output schema needs /task/output/{RESULT_FILE}" if schema else None
    try:
        result.output = json.loads(raw)
    except ValueError as exc:
        return f"{RESULT_FILE} is not valid JSON: {exc}"
    if schema is not None:
        try:
            jsonschema.validate(result.output, schema)
        except jsonschema.ValidationError as exc:
            return f"{RESULT_FILE} fails the output schema: {exc.message}"
        except jsonschema.SchemaError as exc:
            return f"output_schema is not a valid schema: {exc.message}"
    return None
