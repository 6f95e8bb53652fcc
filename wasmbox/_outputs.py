"""What a run leaves in its workspace, read back under caps: streams, /task/output, result.json.

Collection never follows a symlink, refuses special files and hard links, and stops at the
first cap that trips: the reason becomes the run's OUTPUT_REJECTED status. The same walk
serves the cheap in-run check (`over_cap`), whose reasons start with `RUNNING`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from wasmbox._filters import Rejected, filter_bytes, filter_json, filter_name
from wasmbox._staging import json_too_deep
from wasmbox.errors import InputRejected
from wasmbox.models import MiB, OutputPolicy
from wasmbox.policy import Plan
from wasmbox.validation import short, validate

RESULT_FILE = "result.json"
RUNNING = "stopped while running: "  # prefixes the reasons of caps that trip mid-run


@dataclass(frozen=True)
class Streams:
    """A run's captured stdout and stderr, each cut at its cap (and whether it was)."""

    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass
class Collected:
    """What a run left in /task/output and its streams, after caps and filters."""

    files: dict[str, bytes] = field(default_factory=dict)
    output: Any = None
    rejection: str | None = None
    total_bytes: int = 0
    streams: Streams = Streams()
    listed: list[str] | None = None  # internal: the entries, when all were regular files


def flood_limit(cap: int) -> int:
    """How far past its cap a stream may be written before the writer is stopped."""
    return 4 * cap + MiB


def file_size(path: str) -> int:
    """Bytes in `path` now, 0 if it does not exist (yet)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_stream(path: str, cap: int) -> tuple[bytes, bool]:
    """At most `cap` bytes of a captured stream, and whether there was more."""
    try:
        st = os.lstat(path)  # its writer is gone: an empty file needs no open, read, close
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            return b"", False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", False
    try:
        data = _read_upto(fd, cap + 1, st.st_size + 1)
    finally:
        os.close(fd)
    return data[:cap], len(data) > cap


def _read_upto(fd: int, limit: int, size_hint: int, chunk_max: int = 1 << 62) -> bytes:
    """At most `limit` bytes of an open regular file. The first buffer is `size_hint` (the
    file's size + 1, not the cap), later ones at most `chunk_max`; a short read is the end,
    so a file read whole costs no extra read for ``b""``."""
    chunks, size, want_next = [], 0, size_hint
    while size < limit:
        chunk = os.read(fd, want := min(limit - size, want_next, chunk_max))
        chunks.append(chunk)
        size, want_next = size + len(chunk), limit
        if len(chunk) < want:
            break
    return b"".join(chunks)


def output_bytes(output_dir: str, max_depth: int) -> int:
    """Bytes in an output directory now (a monitoring sample, not a cap check)."""
    total = 0
    try:
        for _, _, st, _ in walk(output_dir, max_depth):
            if not stat.S_ISDIR(st.st_mode):
                total += st.st_size
    except Rejected:
        pass  # over_cap reports it
    return total


def over_cap(plan: Plan, output_dir: str, streams: tuple[int, int]) -> str | None:
    """A cheap check while the guest runs: the reason if its writes already break a cap.

    Streams (their sizes, `streams`) are kept up to their cap (the rest is cut, with a
    truncation flag); a guest that keeps writing far past it is a flood and is stopped. The
    output directory is walked fd-relative (no path-length limit), at most `max_depth` deep
    (deeper is a reason of its own), and whatever cannot be inspected counts as over the
    cap. Output reasons start with `RUNNING`, so an early stop is told apart from the check
    after the run.
    """
    for name, size, cap in zip(
        ("stdout", "stderr"), streams, (plan.stdout_bytes, plan.stderr_bytes), strict=True,
    ):
        if size > flood_limit(cap):
            return f"{name} flood: over {flood_limit(cap)} bytes written"
    caps = plan.output
    total = 0
    try:
        for count, (rel, _, st, _) in enumerate(walk(output_dir, caps.max_depth), start=1):
            if count > caps.max_files:
                return f"more than {caps.max_files} output files"
            if stat.S_ISDIR(st.st_mode):
                continue
            total += st.st_size
            if st.st_size > caps.max_file_bytes:
                return f"{RUNNING}{rel} exceeds {caps.max_file_bytes} bytes"
            if total > caps.max_total_bytes:
                return f"{RUNNING}outputs exceed {caps.max_total_bytes} bytes in total"
    except Rejected as exc:
        return f"{RUNNING}{exc}"
    return None


def collect(plan: Plan, output_dir: str) -> Collected:
    """Read an output directory under the plan's caps, filters and output schema."""
    result = Collected()
    try:
        _collect_files(plan.output, output_dir, result)
        result.rejection = _check_result(result, plan)
    except Rejected as exc:
        return Collected(rejection=str(exc))
    return result


def _collect_files(caps: OutputPolicy, output_dir: str, into: Collected) -> None:
    listed: list[str] | None = []
    for count, (rel, name, st, dir_fd) in enumerate(
        walk(output_dir, caps.max_depth, ordered=True), start=1,
    ):
        if count > caps.max_files:  # directories count too, as they do while running
            raise Rejected(f"more than {caps.max_files} output files")
        if stat.S_ISLNK(st.st_mode):
            raise Rejected(f"{rel} is a symlink")
        if stat.S_ISDIR(st.st_mode):
            listed = None
            continue
        if not stat.S_ISREG(st.st_mode):
            raise Rejected(f"{rel} is not a regular file")
        if st.st_nlink > 1:
            raise Rejected(f"{rel} is a hard link")
        data = _read_capped(dir_fd, name, caps.max_file_bytes, rel)
        into.total_bytes += len(data)
        if into.total_bytes > caps.max_total_bytes:
            raise Rejected(f"outputs exceed {caps.max_total_bytes} bytes in total")
        key = filter_name(rel, caps)
        if key in into.files:
            raise Rejected("two output file names are the same once redacted")
        into.files[key] = filter_bytes(data, caps, "an output file" if key != rel else rel)
        if listed is not None:
            listed.append(name)
    into.listed = listed


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def walk(root: str, max_depth: int, *, ordered: bool = False,
          ) -> Iterator[tuple[str, str, os.stat_result, int]]:
    """Relative path, name, lstat and parent directory fd of everything under `root`.

    Depth-first with an explicit stack and fd-relative calls: no recursion and no path-length
    limit, and never a symlink followed. Raises `_Rejected` for a directory deeper than
    `max_depth` and for anything that cannot be listed, opened or stat'ed (fail closed);
    what vanishes meanwhile (a guest still running) is skipped. Holds one fd per level.
    """
    try:
        top = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise Rejected(f"the output directory cannot be opened ({exc.strerror})") from None
    # Frames: directory fd, its relative prefix, its depth, subdirectories still to visit
    # (None until listed).
    frames: list[tuple[int, str, int, list[str] | None]] = [(top, "", 0, None)]
    try:
        while frames:
            fd, prefix, depth, pending = frames[-1]
            if pending is None:
                pending = []
                frames[-1] = (fd, prefix, depth, pending)
                for name, st in _list(fd, prefix, ordered):
                    if stat.S_ISDIR(st.st_mode):
                        if depth + 1 > max_depth:
                            raise Rejected(f"output nests deeper than {max_depth} directories")
                        pending.append(name)
                    yield prefix + name, name, st, fd
                pending.reverse()  # popped in listing order
                continue
            if not pending:
                frames.pop()
                os.close(fd)
                continue
            name = pending.pop()
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise Rejected(f"{prefix}{name} cannot be opened ({exc.strerror})") from None
            frames.append((child, f"{prefix}{name}/", depth + 1, None))
    finally:
        for fd, *_ in frames:
            os.close(fd)


def _list(fd: int, prefix: str, ordered: bool) -> Iterator[tuple[str, os.stat_result]]:
    """Names and lstat results of one directory (given as an fd)."""
    where = prefix.rstrip("/") or "the output directory"
    try:
        it = os.scandir(fd)
    except OSError as exc:
        raise Rejected(f"{where} cannot be listed ({exc.strerror})") from None
    with it:
        entries: Iterator[os.DirEntry[str]] = it
        if ordered:
            try:
                entries = iter(sorted(it, key=lambda e: e.name))
            except OSError as exc:
                raise Rejected(f"{where} cannot be listed ({exc.strerror})") from None
        while True:
            try:
                entry = next(entries, None)
                if entry is None:
                    return
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise Rejected(f"{where} cannot be listed ({exc.strerror})") from None
            yield entry.name, st


def _read_capped(dir_fd: int, name: str, cap: int, rel: str) -> bytes:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise Rejected(f"{rel} cannot be read safely: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected(f"{rel} is not a regular file")
        data = _read_upto(fd, cap + 1, st.st_size + 1, 1 << 20)
        if len(data) > cap:
            raise Rejected(f"{rel} exceeds {cap} bytes")
        return data
    finally:
        os.close(fd)


def _check_result(result: Collected, plan: Plan) -> str | None:
    caps = plan.output
    schema = plan.task.output_schema
    raw = result.files.get(RESULT_FILE)
    if raw is None:
        return f"the output schema needs /task/output/{RESULT_FILE}" if schema else None
    if len(raw) > caps.max_json_bytes:
        return f"{RESULT_FILE} is {len(raw)} bytes, over the {caps.max_json_bytes} cap"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{RESULT_FILE} is not valid JSON: not UTF-8"
    if json_too_deep(raw, caps.max_json_depth):
        return f"{RESULT_FILE} nests deeper than {caps.max_json_depth} levels"
    try:
        output = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"{RESULT_FILE} is not valid JSON: {short(str(exc))}"
    if caps.deny_patterns:
        output, changed = filter_json(output, caps, f"{RESULT_FILE} (decoded)")  # or Rejected
        if changed:
            result.files[RESULT_FILE] = json.dumps(output, ensure_ascii=False).encode(
                "utf-8", "surrogatepass")
    result.output = output
    if schema is not None:
        try:
            validate(schema, output, what=RESULT_FILE)
        except InputRejected as exc:
            return str(exc)
    return None
