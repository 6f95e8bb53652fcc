"""Internal: how a chunk's answer travels from a Dask worker and is checked on the client.

A result travels as a `_Shipped` (its flat fields, its output as JSON text, its files as
bytes), a host error as a `_Refused`; `_decode` checks a chunk's answer entry by entry. An
answer also says which process ran the chunk (`origin`): a run is counted in the metrics of
the process that made it, so the caller counts only the runs made in other processes.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wasmbox.errors import HostFailure, SandboxError
from wasmbox.models import Result, Status

MAX_RESULT_DEPTH = 128  # nesting a result's output may have to travel from a worker
_PROCESS_TOKEN = uuid.uuid4().hex  # tells apart processes of the same pid on other hosts


def origin() -> str:
    """This process, as a chunk's answer names it (a forked child is another process)."""
    return f"{os.getpid()}-{_PROCESS_TOKEN}"


@dataclass(frozen=True)
class _Refused:
    """A host error raised on a worker, carried back as data: its class does not pickle."""

    kind: type[SandboxError]
    text: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def error(self) -> SandboxError:
        exc = self.kind.__new__(self.kind)
        Exception.__init__(exc, self.text)
        exc.__dict__.update(self.attributes)
        return exc


@dataclass(frozen=True)
class _Shipped:
    """A `Result` as it leaves a worker: its flat fields, the output's JSON text, the files.

    Pickling this costs the same however deep the output nests; the output is parsed once,
    on the client, under `MAX_RESULT_DEPTH`.
    """

    header: dict[str, Any]  # the Result without output and files: fixed, shallow nesting
    output: bytes | None  # the output as JSON text; None when there is none
    files: dict[str, bytes]

    @classmethod
    def of(cls, result: Result) -> _Shipped:
        """Encode `result` on the worker; an output too deep to carry is rejected here."""
        output: bytes | None = None
        if result.output is not None:
            try:
                if _deeper_than(result.output, MAX_RESULT_DEPTH):
                    raise ValueError(f"it nests deeper than {MAX_RESULT_DEPTH} levels")
                output = json.dumps(result.output).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                result = _too_deep(result, str(exc))
        header = result.model_dump(exclude={"output", "files"})  # keeps inf/nan metrics
        return cls(header, output, dict(result.files))

    def result(self) -> Result:
        """Decode on the client; an output deeper than `MAX_RESULT_DEPTH` is rejected."""
        result = Result.model_validate(self.header)
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in self.files.items()):
            raise HostFailure("a worker sent output files that are not bytes")
        if self.output is None:
            return result.model_copy(update={"files": self.files})
        try:
            output = json.loads(self.output)  # json's C parser stops at the recursion limit
            if _deeper_than(output, MAX_RESULT_DEPTH):
                raise ValueError(f"it nests deeper than {MAX_RESULT_DEPTH} levels")
        except (ValueError, RecursionError) as exc:
            return _too_deep(result, str(exc))
        return result.model_copy(update={"output": output, "files": self.files})


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON-like `value` nests more than `limit` containers deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep(result: Result, why: str) -> Result:
    return result.model_copy(update={
        "status": Status.OUTPUT_REJECTED, "output": None, "files": {},
        "reason": f"the result cannot be carried back from a Dask worker: {why}",
    })


def _decode(key: str, value: Any, ids: list[str]
            ) -> tuple[list[Result | SandboxError], float, bool] | SandboxError:
    """A chunk's answer checked: one entry per task, each for its task, a finite duration;
    and whether it ran in another process (its runs are not in this process's metrics)."""
    if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], list)
            and len(value[0]) == len(ids) and isinstance(value[1], float)
            and isinstance(value[2], str)):
        return HostFailure(f"chunk {key!r}: a worker returned {type(value).__name__}, "
                           f"not one answer for each of its {len(ids)} tasks")
    settled = [_one(task_id, item) for task_id, item in zip(ids, value[0], strict=True)]
    busy_s = value[1] if math.isfinite(value[1]) and value[1] > 0 else 0.0
    return settled, busy_s, value[2] != origin()


def _one(task_id: str, item: Any) -> Result | SandboxError:
    """One task's entry of a chunk's answer, checked; never raises."""
    if isinstance(item, _Refused):
        return item.error()
    if not isinstance(item, _Shipped):
        return HostFailure(f"task {task_id!r}: a worker returned {type(item).__name__}")
    try:
        result = item.result()
    except SandboxError as exc:
        return exc
    except Exception as exc:  # a malformed header: pydantic refused it
        return HostFailure(f"task {task_id!r}: a worker sent a malformed result: "
                           f"{type(exc).__name__}: {str(exc)[:200]}")
    if result.task_id != task_id:
        return HostFailure(f"task {task_id!r}: a worker answered for {result.task_id!r}")
    return result

