"""The per-run host directory: input staged read-only, outputs collected under caps.

Layout on the host (``<root>/wasmbox-XXXX/``)::

    task/             guest /task          (read-only to the guest)
    task/input.json   guest /task/input.json
    task/output/      guest /task/output   (the only writable place)

Collection never follows a symlink, refuses special files and hard links, and stops at the
first cap that trips: the reason becomes the run's OUTPUT_REJECTED status.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import operator
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

from wasmbox._config import HostConfig
from wasmbox.errors import InputRejected
from wasmbox.lifecycle import Closeable, process_alive
from wasmbox.models import DenyAction, MiB, OutputPolicy
from wasmbox.policy import Plan
from wasmbox.validation import short, validate

log = logging.getLogger("wasmbox")

PREFIX = "wasmbox-"
RESULT_FILE = "result.json"
REDACTED = b"[REDACTED]"


def workspace_root() -> Path:
    """Where workspaces live now, per the environment (see `HostConfig`)."""
    return HostConfig.from_env().workspace_root


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
    """Remove workspaces whose owning process is gone; returns their paths.

    Never raises: what cannot be removed (a tree planted by someone else, a permission) is
    logged and left, so starting a sandbox never depends on what is in the root.
    """
    reclaimed: list[str] = []
    base = root or workspace_root()
    try:
        with os.scandir(base) as it:
            entries = [entry.name for entry in it]
    except OSError as exc:
        log.warning("cannot list workspace root %s to reclaim stale workspaces: %s", base, exc)
        return reclaimed
    for name in entries:
        owner = name[len(PREFIX):].split("-", 1)[0]
        if not name.startswith(PREFIX) or not owner.isdigit() or process_alive(int(owner)):
            continue
        path = os.path.join(base, name)
        try:
            remove_tree(path)
        except Exception:
            log.warning("cannot reclaim stale workspace %s", path, exc_info=True)
            continue
        reclaimed.append(path)
    return reclaimed


def encode_input(plan: Plan) -> bytes:
    """The task input as JSON bytes, checked against the size cap, the nesting cap and the
    input schema (`InputRejected` otherwise)."""
    task = plan.task
    depth = plan.policy.limits.input_depth
    try:
        data = json.dumps(task.input, allow_nan=False, separators=(",", ":")).encode()
    except RecursionError:
        raise InputRejected(f"input nests deeper than {depth} levels "
                            "(the policy's [limits] input_depth)") from None
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"input is not JSON: {exc}") from exc
    if len(data) > plan.input_bytes:
        raise InputRejected(f"input is {len(data)} bytes, over the {plan.input_bytes} cap "
                            "(the policy's [limits] input_bytes)")
    if json_too_deep(data, depth):
        raise InputRejected(f"input nests deeper than {depth} levels "
                            "(the policy's [limits] input_depth)")
    if task.input_schema is not None:
        validate(task.input_schema, task.input, what="input")
    return data


_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SQUARE = bytes.maketrans(b"{}", b"[]")
# Openers count 2, closers 0: the running sum minus the position is the nesting depth.
_STEP = bytes.maketrans(b"[]", b"\x02\x00")
_CHUNK = 1 << 16


def _brackets(data: bytes) -> bytes:
    """The structural brackets of JSON text, braces as square brackets, strings dropped.

    Escaped backslashes go first, then escaped quotes; what is left between quotes is a
    string. An unterminated string ends the text (a parser fails there).
    """
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(text.split(b'"')[::2])
    return outside.translate(_SQUARE, _NOT_BRACKET)


def json_depth(data: bytes) -> int:
    """How deep JSON text nests, found without parsing (so without recursing).

    Exact for valid JSON. For anything else never less than what a parser reaches before it
    fails: past an unbalanced closer (where a parser stops) the count may only be higher.
    """
    steps = _brackets(data).translate(_STEP)
    return max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)


def json_too_deep(data: bytes, limit: int) -> bool:
    """``json_depth(data) > limit``, fast: adjacent ``[]`` pairs are peeled off first (at C
    speed; typical JSON is gone after a few passes) and the scan stops early both ways."""
    seq = _brackets(data)
    passes = 0
    while seq and passes < limit:
        peeled = seq.replace(b"[]", b"")
        if len(peeled) == len(seq):
            break
        seq, passes = peeled, passes + 1
    # Peeling keeps the depth of what remains, and each pass lowers the maximum by at most 1.
    if passes:
        if not _exceeds(seq, limit - passes):
            return False
        if _exceeds(seq, limit):
            return True
        seq = _brackets(data)  # in between: count the original exactly
    return _exceeds(seq, limit)


def _exceeds(seq: bytes, limit: int) -> bool:
    steps = seq.translate(_STEP)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        run = list(map(operator.sub, itertools.accumulate(steps[start:start + _CHUNK],
                                                          initial=depth), itertools.count()))
        if max(run) > limit:
            return True
        if min(run) < 0:  # an unbalanced closer: a parser stops there
            return False
        depth = run[-1]
    return False


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


RUNNING = "stopped while running: "  # prefixes the reasons of caps that trip mid-run


class Workspace(Closeable):
    """A fresh directory per run; `close()` removes it whatever the guest left inside.

    `data` is the already encoded input (`encode_input`), when the caller checked it early.
    """

    def __init__(self, plan: Plan, root: Path | None = None, *, data: bytes | None = None) -> None:
        if data is None:
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
            try:
                _clear_shallow(self.path, _SHALLOW)  # the usual few entries, cheaply
                os.rmdir(self.path)
            except (OSError, _TooDeep):
                remove_tree(self.path)  # the thorough way: any depth, locked dirs, links
        except Exception:  # cleanup never fails a run; a leftover is reclaimed after we exit
            log.warning("cannot remove workspace %s", self.path, exc_info=True)

    def output_bytes(self) -> int:
        """Bytes in /task/output now (a monitoring sample, not a cap check)."""
        total = 0
        try:
            for _, _, st, _ in _walk(self.output_dir, self.plan.output.max_depth):
                if not stat.S_ISDIR(st.st_mode):
                    total += st.st_size
        except _Rejected:
            pass  # over_cap reports it
        return total

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

    def read_streams(self) -> Streams:
        """Both captured streams, each cut at the plan's cap: read once, by the sandbox."""
        stdout, stdout_truncated = self.read_stream(self.stdout_path, self.plan.stdout_bytes)
        stderr, stderr_truncated = self.read_stream(self.stderr_path, self.plan.stderr_bytes)
        return Streams(stdout, stderr, stdout_truncated, stderr_truncated)

    def over_cap(self) -> str | None:
        """A cheap check while the guest runs: the reason if its writes already break a cap.

        Streams are kept up to their cap (the rest is cut, with a truncation flag); a guest
        that keeps writing far past it is a flood and is stopped. /task/output is walked
        fd-relative (no path-length limit), at most `max_depth` deep (deeper is a reason of its
        own), and whatever cannot be inspected counts as over the cap. Output reasons start
        with `RUNNING`, so an early stop is told apart from the check after the run.
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
        try:
            for count, (rel, _, st, _) in enumerate(
                _walk(self.output_dir, caps.max_depth), start=1,
            ):
                if count > caps.max_files:
                    return f"more than {caps.max_files} output files"
                if stat.S_ISDIR(st.st_mode):
                    continue
                total += st.st_size
                if st.st_size > caps.max_file_bytes:
                    return f"{RUNNING}{rel} exceeds {caps.max_file_bytes} bytes"
                if total > caps.max_total_bytes:
                    return f"{RUNNING}outputs exceed {caps.max_total_bytes} bytes in total"
        except _Rejected as exc:
            return f"{RUNNING}{exc}"
        return None

    def collect(self) -> Collected:
        """Read /task/output under the plan's caps, filters and output schema."""
        self._ensure_open()
        result = Collected()
        try:
            self._collect_files(result)
            result.rejection = _check_result(result, self.plan)
        except _Rejected as exc:
            return Collected(rejection=str(exc))
        return result

    def _collect_files(self, into: Collected) -> None:
        caps = self.plan.output
        for count, (rel, name, st, dir_fd) in enumerate(
            _walk(self.output_dir, caps.max_depth, ordered=True), start=1,
        ):
            if count > caps.max_files:  # directories count too, as they do while running
                raise _Rejected(f"more than {caps.max_files} output files")
            if stat.S_ISLNK(st.st_mode):
                raise _Rejected(f"{rel} is a symlink")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _Rejected(f"{rel} is not a regular file")
            if st.st_nlink > 1:
                raise _Rejected(f"{rel} is a hard link")
            data = _read_capped(dir_fd, name, caps.max_file_bytes, rel)
            into.total_bytes += len(data)
            if into.total_bytes > caps.max_total_bytes:
                raise _Rejected(f"outputs exceed {caps.max_total_bytes} bytes in total")
            key = _filter_name(rel, caps)
            if key in into.files:
                raise _Rejected("two output file names are the same once redacted")
            into.files[key] = filter_bytes(data, caps, "an output file" if key != rel else rel)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _walk(root: str, max_depth: int, *, ordered: bool = False,
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
        raise _Rejected(f"the output directory cannot be opened ({exc.strerror})") from None
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
                            raise _Rejected(f"output nests deeper than {max_depth} directories")
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
                raise _Rejected(f"{prefix}{name} cannot be opened ({exc.strerror})") from None
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
        raise _Rejected(f"{where} cannot be listed ({exc.strerror})") from None
    with it:
        entries: Iterator[os.DirEntry[str]] = it
        if ordered:
            try:
                entries = iter(sorted(it, key=lambda e: e.name))
            except OSError as exc:
                raise _Rejected(f"{where} cannot be listed ({exc.strerror})") from None
        while True:
            try:
                entry = next(entries, None)
                if entry is None:
                    return
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _Rejected(f"{where} cannot be listed ({exc.strerror})") from None
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


_SHALLOW = 4  # levels below the workspace the cheap removal goes: task/output/<2 levels>


class _TooDeep(Exception):
    pass


def _clear_shallow(path: str, levels: int) -> None:
    """Empty `path` with path-based calls, at most `levels` deep (bounded recursion).

    About half the cost of `remove_tree` for a typical workspace; anything unusual (a
    deeper tree, a locked directory) raises and `remove_tree` finishes the job.
    """
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                if levels == 0:
                    raise _TooDeep
                _clear_shallow(entry.path, levels - 1)
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


def _read_capped(dir_fd: int, name: str, cap: int, rel: str) -> bytes:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
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


# --- deny patterns ------------------------------------------------------------------------


class _Matcher:
    """One deny pattern: RE2 (linear time) when it can compile it, else Python's `re`."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.engine: Any
        try:
            self.engine = re2.compile(pattern.encode(), _RE2_OPTIONS)
        except re2.error:
            log.info("deny pattern %r needs Python's re (RE2 cannot compile it)", pattern)
            self.engine = re.compile(pattern.encode())

    def search(self, data: bytes) -> bool:
        return self.engine.search(data) is not None

    def sub(self, data: bytes) -> bytes:
        result: bytes = self.engine.sub(REDACTED, data)
        return result


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def filter_bytes(data: bytes, caps: OutputPolicy, where: str) -> bytes:
    """Apply the deny patterns: redact matches, or reject naming the pattern and place."""
    for matcher in _compiled(caps.deny_patterns):
        if caps.on_deny is DenyAction.REDACT:
            data = matcher.sub(data)
        elif matcher.search(data):
            raise _Rejected(f"deny pattern {matcher.pattern!r} matched in {where}")
    return data


def redact(data: bytes, caps: OutputPolicy) -> bytes:
    """Every deny-pattern match replaced by ``[REDACTED]``, whatever `on_deny` says."""
    for matcher in _compiled(caps.deny_patterns):
        data = matcher.sub(data)
    return data


def redact_text(text: str, caps: OutputPolicy) -> str:
    """`redact` for text (a reason, a decoded string); the text is unchanged if nothing matched."""
    if not caps.deny_patterns:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    clean = redact(raw, caps)
    return text if clean == raw else clean.decode("utf-8", "replace")


def filter_stream(data: bytes, caps: OutputPolicy, where: str) -> tuple[bytes, str | None]:
    """`filter_bytes` for stdout/stderr: the bytes with every match redacted (whatever
    `on_deny` says: a rejected stream is still returned), and the rejection if any."""
    if not caps.filter_streams or not caps.deny_patterns:
        return data, None
    try:
        return filter_bytes(data, caps, where), None
    except _Rejected as exc:
        return redact(data, caps), str(exc)


def _filter_name(rel: str, caps: OutputPolicy) -> str:
    """An output file's name (its key in `Result.files`) under the deny patterns."""
    if not caps.deny_patterns:
        return rel
    if caps.on_deny is DenyAction.REDACT:
        return redact_text(rel, caps)
    filter_bytes(rel.encode("utf-8", "surrogateescape"), caps, "an output file name")
    return rel


_PATTERN_CACHE: dict[tuple[str, ...], list[_Matcher]] = {}


def _compiled(patterns: tuple[str, ...]) -> list[_Matcher]:
    if not patterns:
        return []
    found = _PATTERN_CACHE.get(patterns)
    if found is None:
        found = [_Matcher(p) for p in patterns]
        if len(_PATTERN_CACHE) > 64:
            _PATTERN_CACHE.clear()
        _PATTERN_CACHE[patterns] = found
    return found


def _filter_output(output: Any, caps: OutputPolicy) -> tuple[Any, bool]:
    """The decoded result with deny patterns applied to every string and key (so JSON
    escapes cannot hide a match); returns it and whether anything was redacted. Iterative;
    mutates `output` (freshly parsed) in place."""
    changed = False

    def clean(text: str) -> str:
        nonlocal changed
        raw = text.encode("utf-8", "surrogatepass")
        filtered = filter_bytes(raw, caps, f"{RESULT_FILE} (decoded)")
        if filtered == raw:
            return text
        changed = True
        return filtered.decode("utf-8", "replace")

    if isinstance(output, str):
        return clean(output), changed
    stack = [output] if isinstance(output, list | dict) else []
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    node[i] = clean(value)
                elif isinstance(value, list | dict):
                    stack.append(value)
            continue
        items = list(node.items())
        node.clear()
        for key, value in items:
            if isinstance(value, str):
                value = clean(value)
            elif isinstance(value, list | dict):
                stack.append(value)
            node[clean(key)] = value
    return output, changed


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
        output, changed = _filter_output(output, caps)  # raises _Rejected on REJECT
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
