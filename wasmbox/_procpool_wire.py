"""Internal: what a `ProcessPool` worker sends back, and how the parent rebuilds it.

A worker runs guest code in its own address space, so its replies are never a pickle: one
length-checked frame per chunk (a JSON header, then the bodies) holding per task a `Result`
(JSON; files as raw bytes beside it) or the `SandboxError` it raised, rebuilt as the same
class of ``wasmbox.errors`` (anything else arrives as `HostFailure`). A frame that breaks the
rules raises `Malformed`.
"""

from __future__ import annotations

import json
import struct
import traceback
from typing import Any

from wasmbox import errors
from wasmbox.errors import SandboxError
from wasmbox.models import Policy, Result

READY_BYTES = 64 * 1024  # the most a worker's ready (or start failure) message may take
_HEADER = struct.Struct(">I")
_RESULT, _RESULT_PY, _ERROR = "r", "p", "e"


class Malformed(Exception):
    """A worker's frame that does not follow the protocol."""


def reply_bound(policy: Policy) -> int:
    """The most one task's reply may take: streams (JSON may escape a byte into six),
    files, result.json re-encoded, and room for the rest."""
    limits, output = policy.limits, policy.output
    streams = 6 * (limits.stdout_bytes + limits.stderr_bytes)
    return streams + output.max_total_bytes + 6 * output.max_file_bytes + (1 << 20)


def encode_frame(replies: list[tuple[str, bytes, dict[str, bytes]]]) -> bytes:
    """[kind, body, files] per task -> one frame: header length, JSON header, bodies."""
    header = []
    bodies: list[bytes] = []
    for kind, body, files in replies:
        header.append([kind, len(body), [[name, len(data)] for name, data in files.items()]])
        bodies.append(body)
        bodies.extend(files.values())
    head = json.dumps(header).encode()
    return b"".join([_HEADER.pack(len(head)), head, *bodies])


def decode_frame(frame: bytes, count: int) -> list[Any]:
    """A worker's frame -> a Result or an exception per task; `Malformed` if it is not one."""
    view = memoryview(frame)
    if len(view) < _HEADER.size:
        raise Malformed("short frame")
    (head_len,) = _HEADER.unpack_from(view)
    at = _HEADER.size + head_len
    try:
        header = json.loads(bytes(view[_HEADER.size:at]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"header: {exc}") from exc
    if not isinstance(header, list) or len(header) != count:
        raise Malformed("wrong number of replies")

    def take(size: object) -> bytes:
        nonlocal at
        if not isinstance(size, int) or size < 0 or at + size > len(view):
            raise Malformed("a length runs past the frame")
        data = bytes(view[at:at + size])
        at += size
        return data

    replies = []
    for entry in header:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], list)):
            raise Malformed("a reply entry has the wrong shape")
        kind, size, file_sizes = entry
        body = take(size)
        files = {}
        for item in file_sizes:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise Malformed("a file entry has the wrong shape")
            files[item[0]] = take(item[1])
        replies.append(_decode(kind, body, files))
    if at != len(view):
        raise Malformed("bytes left over after the last reply")
    return replies


def encode_result(result: Result) -> tuple[str, bytes, dict[str, bytes]]:
    """A `Result` as one reply: its JSON without files, and the files beside it."""
    try:
        return _RESULT, result.model_dump_json(exclude={"files"}).encode(), result.files
    except ValueError:  # a str pydantic will not encode (a lone surrogate): escape it
        data = json.dumps(result.model_dump(mode="json", exclude={"files"})).encode()
        return _RESULT_PY, data, result.files


def encode_error(exc: Exception) -> tuple[str, bytes, dict[str, bytes]]:
    """An exception `Sandbox.run` raised as one reply (class name, args, fields)."""
    # Class name, args and fields rather than a pickle: the parent only rebuilds classes of
    # wasmbox.errors, and PolicyViolation(rule, message) would not survive pickling anyway.
    if isinstance(exc, SandboxError) and getattr(errors, type(exc).__name__, None) is type(exc):
        name, args, fields = type(exc).__name__, exc.args, dict(vars(exc))
    else:
        name, args, fields = "HostFailure", (f"{type(exc).__name__}: {exc}",), {}
    fields.pop("__notes__", None)
    payload = {"type": name, "args": [_plain(a) for a in args],
               "fields": {k: _plain(v) for k, v in fields.items()},
               "remote": "".join(traceback.format_exception(exc))}
    return _ERROR, json.dumps(payload).encode(), {}


def _plain(value: object) -> object:
    """`value` if JSON carries it as is, else its text."""
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _decode(kind: object, body: bytes, files: dict[str, bytes]) -> Any:
    try:
        if kind == _RESULT:
            result = Result.model_validate_json(body)
        elif kind == _RESULT_PY:
            result = Result.model_validate(json.loads(body))
        elif kind == _ERROR:
            return _rebuild_error(json.loads(body))
        else:
            raise Malformed(f"unknown reply kind {kind!r}")
    except ValueError as exc:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise Malformed(f"a reply does not decode: {exc}") from exc
    return result.model_copy(update={"files": files}) if files else result


def _rebuild_error(payload: Any) -> BaseException:
    if not isinstance(payload, dict):
        raise Malformed("an error reply is not an object")
    cls = getattr(errors, str(payload.get("type")), None)
    args, fields = payload.get("args"), payload.get("fields")
    if not (isinstance(cls, type) and issubclass(cls, SandboxError)
            and isinstance(args, list) and isinstance(fields, dict)):
        raise Malformed("an error reply names no wasmbox error")
    exc = cls.__new__(cls)
    exc.args = tuple(args)
    for key, value in fields.items():
        if isinstance(key, str) and not key.startswith("__"):
            setattr(exc, key, value)
    exc.add_note(f"raised in a wasmbox worker process:\n{payload.get('remote', '')}")
    return exc
