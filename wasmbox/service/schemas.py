"""The wire format of the HTTP API (what the OpenAPI spec describes)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from wasmbox._models.result import ResultShape
from wasmbox.models import (
    Resources,
    Result,
    Task,
    TaskKind,
    TierName,
    parse_duration,
    parse_size,
)
from wasmbox.service.store import Record, State

Name = Annotated[str, Field(min_length=1, max_length=128)]
_NO_RESOURCES = Resources()


class _TaskIds:
    """Fresh task ids, shaped as uuid4 hex: a keyed BLAKE2b of a counter (unpredictable
    without the key, drawn from the OS once a process). ``uuid4()`` reads the OS's random
    source for every id, and that lets go of the GIL: on the event loop, a wait for another
    thread to hand it back."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._key = os.urandom(32)
        self._counter = itertools.count()

    def __call__(self) -> str:
        digest = bytearray(hashlib.blake2b(next(self._counter).to_bytes(8, "little"),
                                           key=self._key, digest_size=16).digest())
        digest[6] = digest[6] & 0x0F | 0x40  # version 4
        digest[8] = digest[8] & 0x3F | 0x80  # RFC 4122 variant
        return digest.hex()


fresh_task_id = _TaskIds()


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

# The library's size and duration strings, spelled for OpenAPI (ECMA regex, ASCII digits; the
# short length keeps float() of the digits finite). Parsed by the library's own parsers.
_SIZE_PATTERN = r"^[ ]*[0-9]{1,15}([.][0-9]{1,6})?[ ]*([kKmMgGtT]([iI]?[bB])?)?[ ]*$"
_DURATION_PATTERN = r"^[ ]*[0-9]{1,15}([.][0-9]{1,6})?[ ]*([uUmM]?[sS]|µ[sS]|[mMhH])?[ ]*$"


def _positive(parse: Any) -> Any:
    def check(value: Any) -> Any:
        number = parse(value)
        if number <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        return number
    return check


SizeText = Annotated[str, Field(max_length=40, pattern=_SIZE_PATTERN,
                                examples=["64M", "64MiB", "64MB"])]
DurationText = Annotated[str, Field(max_length=40, pattern=_DURATION_PATTERN,
                                    examples=["2s", "250ms", "1m"])]
Size = Annotated[PositiveInt | SizeText, AfterValidator(_positive(parse_size)),
                 Field(description="bytes, or a size such as '64M', '64MiB', '64MB'")]
Duration = Annotated[PositiveFloat | DurationText, AfterValidator(_positive(parse_duration)),
                     Field(description="seconds, or a duration such as '2s', '250ms', '1m'")]


class ResourcesRequest(BaseModel):
    """What a task requests, as in the library: sizes and durations as numbers (bytes,
    seconds) or strings (``"64M"``, ``"2s"``); the policy clamps every field."""

    model_config = ConfigDict(extra="forbid")

    fuel: PositiveInt | None = None
    memory: Size | None = None
    timeout: Duration | None = None
    output_bytes: Size | None = None
    stdout_bytes: Size | None = None
    cpus: PositiveFloat | None = None
    pids: PositiveInt | None = None
    disk: Size | None = None


class _TaskFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: JsonValue = None
    args: list[str] = Field(default_factory=list, max_length=256)
    env: dict[str, str] = Field(default_factory=dict)
    resources: ResourcesRequest = Field(default_factory=ResourcesRequest,
                                        json_schema_extra={"default": {}})
    tier: TierName = TierName.AUTO
    output_schema: dict[str, Any] | None = None
    policy: Name | None = Field(default=None, description="a policy name the token may use")

    def _common(self) -> dict[str, Any]:
        requested = self.resources.model_dump(exclude_none=True)
        return {
            "input": self.input, "args": tuple(self.args), "env": self.env,
            "resources": Resources(**requested) if requested else _NO_RESOURCES,
            "tier": self.tier, "output_schema": self.output_schema,
        }


class WasmTaskRequest(_TaskFields):
    """A WASI command module, base64-encoded or by the SHA-256 of one this token submitted
    before, with one JSON input."""

    kind: Literal["wasm"]
    module_b64: str | None = Field(default=None, description="the WASI module, base64",
                                   json_schema_extra={"format": "byte"})
    module_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None, description="instead of module_b64: the SHA-256 (hex) of a module this "
        "token submitted recently (the service keeps each for its module_retention after its "
        "last use); 400 if it has none")

    @field_validator("module_b64")
    @classmethod
    def _is_base64(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"module_b64 is not base64: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_module(self) -> WasmTaskRequest:
        if (self.module_b64 is None) == (self.module_sha256 is None):
            raise ValueError("give exactly one of module_b64 or module_sha256")
        return self

    def to_task(self, module: bytes | None = None) -> Task:
        """The library `Task`; the module travels as bytes, never as a host path (`module`:
        the bytes `module_sha256` names, which the caller looked up)."""
        if module is None:
            if self.module_b64 is None:
                raise ValueError("module_sha256 names a module the caller must look up")
            module = base64.b64decode(self.module_b64)
        return Task(id=fresh_task_id(), kind=TaskKind.WASM, module_bytes=module, **self._common())


class PythonTaskRequest(_TaskFields):
    """Python source; ``entry(input)`` is called if the source defines it."""

    kind: Literal["python"]
    source: str = Field(description="Python source code")
    entry: Name = "main"

    def to_task(self, module: bytes | None = None) -> Task:
        """The library `Task`."""
        return Task.python(self.source, entry=self.entry, **self._common())


class CommandTaskRequest(_TaskFields):
    """A native program (an argv list) for the container and VM tiers."""

    kind: Literal["command"]
    argv: list[Annotated[str, Field(max_length=65536)]] = Field(
        min_length=1, max_length=256, description="the program and its arguments (not split)")
    tier: TierName = TierName.CONTAINER
    args: list[str] = Field(default_factory=list, max_length=0,
                            description="unused: a command's arguments are in argv")

    def to_task(self, module: bytes | None = None) -> Task:
        """The library `Task`."""
        common = self._common()
        del common["args"]
        return Task(id=fresh_task_id(), kind=TaskKind.COMMAND, argv=tuple(self.argv), **common)


AnyTaskRequest = WasmTaskRequest | PythonTaskRequest | CommandTaskRequest
TaskRequest = Annotated[AnyTaskRequest, Field(discriminator="kind")]


# Derived from the fields of `Result` (not a copy of them), so every field a result gains is
# shown by the API too.
class ResultView(ResultShape[int]):
    """A `Result` with output files listed by name and size (fetch each from /files/)."""

    model_config = ConfigDict(frozen=False, extra="ignore")

    @classmethod
    def of(cls, result: Result, sizes: dict[str, int]) -> ResultView:
        data = result.model_dump(exclude={"files"})
        return cls(**data, files=sizes)


class TaskView(BaseModel):
    """Where a task is; `result` once it finished, `error` if the host refused to run it."""

    id: str
    state: State
    policy: str
    final: bool
    cancel_requested: bool
    attempts: int
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: ResultView | None = None
    error: str | None = None
    charged_s: float | None = Field(
        default=None, description="seconds charged to the token's CPU budget once final: "
        "max(CPU seconds, wall seconds a worker was held); rejected runs are charged too")

    @classmethod
    def of(cls, record: Record) -> TaskView:
        result = None if record.result is None else ResultView.of(record.result,
                                                                   record.file_sizes)
        return cls(**_view_fields(record), result=result)


def _view_fields(record: Record) -> dict[str, Any]:
    """A `TaskView`'s fields from a record, all but ``result``."""
    return {
        "id": record.id, "state": record.state, "policy": record.policy,
        "final": record.state in (State.FINISHED, State.REJECTED),
        "cancel_requested": record.cancel_requested, "attempts": record.attempts,
        "submitted_at": record.submitted_at, "started_at": record.started_at,
        "finished_at": record.finished_at, "error": record.error,
        "charged_s": record.charged_s,
    }


def view_json(record: Record) -> bytes:
    """``TaskView.of(record)`` as FastAPI answers it (JSON, by alias), byte for byte, built
    without validating again what the journal's models already hold."""
    result = record.result
    view = TaskView.model_construct(
        **_view_fields(record),
        result=None if result is None else ResultView.model_construct(
            **{name: getattr(result, name) for name in _RESULT_FIELDS},
            files=record.file_sizes),
    )
    return view.__pydantic_serializer__.to_json(view, by_alias=True)


_RESULT_FIELDS = tuple(name for name in ResultView.model_fields if name != "files")


class TaskList(BaseModel):
    """One page of the caller's tasks, newest first; pass `next_cursor` as `cursor` for the
    next page (null: this is the last one)."""

    tasks: list[TaskView]
    next_cursor: int | None = None


class PolicyList(BaseModel):
    """The policies a token may name; the first is its default."""

    policies: list[str]


class Problem(BaseModel):
    """An error response."""

    detail: str
