"""Internal: what a task asks for — `Task` (code plus one JSON input) and its `Resources`.

Public through `wasmbox` and `wasmbox.models`; import from there.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import Field, JsonValue, ValidationError, model_validator

from wasmbox._models.kinds import TaskKind, TierName, check_capability
from wasmbox._models.network import MAX_ENDPOINTS, Endpoint
from wasmbox._models.units import Bytes, Frozen, Seconds
from wasmbox.errors import InputRejected, InvalidTask, ModuleRejected


class Resources(Frozen):
    """What a task requests. Unset fields take the policy's maximum; nothing exceeds it."""

    fuel: Annotated[int, Field(gt=0)] | None = None
    memory: Bytes | None = None
    timeout: Seconds | None = None
    output_bytes: Bytes | None = None
    stdout_bytes: Bytes | None = None
    cpus: Annotated[float, Field(gt=0)] | None = None
    pids: Annotated[int, Field(gt=0)] | None = None
    disk: Bytes | None = None  # bytes the task may write: outputs, and /tmp, each at most

    if TYPE_CHECKING:  # what callers may pass: sizes and durations as strings too

        def __init__(
            self,
            *,
            fuel: int | None = None,
            memory: int | str | None = None,
            timeout: float | str | None = None,
            output_bytes: int | str | None = None,
            stdout_bytes: int | str | None = None,
            cpus: float | None = None,
            pids: int | None = None,
            disk: int | str | None = None,
        ) -> None: ...


class Task(Frozen):
    """Code plus one JSON input. Build one with `Task.wasm`, `Task.python` or `Task.command`."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: TaskKind
    module: Path | None = None
    module_bytes: bytes | None = Field(default=None, repr=False)
    source: str | None = Field(default=None, repr=False)
    entry: str = "main"
    argv: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    input: JsonValue = None
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    resources: Resources = Resources()
    tier: TierName = TierName.AUTO
    runtime: str | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    # True: every endpoint the policy allows; a list: only these (each within the policy).
    network: bool | tuple[str, ...] = False
    capabilities: tuple[str, ...] = ()  # e.g. "CAP_NET_BIND_SERVICE"; within the policy's

    @model_validator(mode="after")
    def _code_matches_kind(self) -> Self:
        if self.kind is TaskKind.WASM and (self.module is None) == (self.module_bytes is None):
            raise ValueError("a wasm task needs exactly one of module (a path) or module_bytes")
        if self.kind is TaskKind.PYTHON and self.source is None:
            raise ValueError("a python task needs source")
        if self.kind is TaskKind.COMMAND and not self.argv:
            raise ValueError("a command task needs a non-empty argv")
        if not isinstance(self.network, bool):
            if len(self.network) > MAX_ENDPOINTS:
                raise ValueError(f"network: at most {MAX_ENDPOINTS} endpoints")
            for text in self.network:
                Endpoint.parse(text)
        for cap in self.capabilities:
            check_capability(cap)
        env = [f"{name}={value}" for name, value in self.env.items()]
        for text in (self.source or "", self.entry, *self.args, *self.argv, *env):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputRejected(
                    f"task text is not valid Unicode (a lone surrogate at {exc.start}): "
                    "source, entry, args, argv and env must encode as UTF-8"
                ) from None
        return self

    @classmethod
    def wasm(
        cls,
        module: str | Path | bytes,
        *,
        input: JsonValue = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        sha256: str | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        resources: Resources | None = None,
        tier: TierName | str = TierName.AUTO,
        network: bool | Sequence[str] = False,
        capabilities: Sequence[str] = (),
        id: str | None = None,
    ) -> Task:
        """A WASI command module, given as a path or as bytes; `args` become its argv[1:]."""
        code: dict[str, Any] = (
            {"module_bytes": bytes(module)} if isinstance(module, bytes | bytearray)
            else {"module": Path(module)}
        )
        return cls._build(
            kind=TaskKind.WASM, **code, input=input, args=tuple(_strings(args, "args")),
            env=env, sha256=sha256, input_schema=input_schema, output_schema=output_schema,
            resources=resources, tier=tier, network=_network(network),
            capabilities=tuple(_strings(capabilities, "capabilities")), id=id,
        )

    @classmethod
    def python(
        cls,
        source: str | Path,
        *,
        input: JsonValue = None,
        entry: str = "main",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        resources: Resources | None = None,
        tier: TierName | str = TierName.AUTO,
        runtime: str | None = None,
        network: bool | Sequence[str] = False,
        capabilities: Sequence[str] = (),
        id: str | None = None,
    ) -> Task:
        """Python source text, or a `Path` to a ``.py`` file; ``main(input)`` is called if defined.

        A `str` is always source, never a file name: text from a user must not be able to
        make the host read one of its files. `args` must be empty: Python tasks take their
        data from `input` (an argv would be silently meaningless, so it is refused).
        """
        if _strings(args, "args"):
            raise InvalidTask("args are not supported for Python tasks; pass data in input")
        if isinstance(source, Path):
            try:
                source = Path(source).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModuleRejected(f"cannot read Python source {source}: {exc}") from exc
        return cls._build(
            kind=TaskKind.PYTHON, source=source, input=input, entry=entry, env=env,
            input_schema=input_schema, output_schema=output_schema, resources=resources,
            tier=tier, runtime=runtime, network=_network(network),
            capabilities=tuple(_strings(capabilities, "capabilities")), id=id,
        )

    @classmethod
    def command(
        cls,
        argv: Sequence[str],
        *,
        input: JsonValue = None,
        env: Mapping[str, str] | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        resources: Resources | None = None,
        tier: TierName | str = TierName.CONTAINER,
        runtime: str | None = None,
        network: bool | Sequence[str] = False,
        capabilities: Sequence[str] = (),
        id: str | None = None,
    ) -> Task:
        """A native program for the container and VM tiers, as an argv list.

        A single string is refused (it is not split): ``Task.command(["sh", "-c", "ls -la"])``
        or ``Task.command(shlex.split("ls -la"))``.
        """
        if isinstance(argv, str | bytes):
            raise InvalidTask(
                f"Task.command takes an argv list, not a string: {argv!r} "
                f"(did you mean {shlex.split(argv) if isinstance(argv, str) else [argv]!r}?)"
            )
        return cls._build(
            kind=TaskKind.COMMAND, argv=tuple(_strings(argv, "argv")), input=input, env=env,
            input_schema=input_schema, output_schema=output_schema, resources=resources,
            tier=tier, runtime=runtime, network=_network(network),
            capabilities=tuple(_strings(capabilities, "capabilities")), id=id,
        )

    @classmethod
    def _build(cls, **fields: Any) -> Task:
        given = {k: v for k, v in fields.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise InvalidTask(f"invalid task: {_describe(exc)}") from None


def _network(value: bool | Sequence[str]) -> bool | tuple[str, ...]:
    return value if isinstance(value, bool) else tuple(_strings(value, "network"))


def _strings(values: Sequence[str], what: str) -> list[str]:
    if isinstance(values, str | bytes):
        raise InvalidTask(f"{what} must be a list of strings, not one string: {values!r}")
    items = list(values)
    if not all(isinstance(v, str) for v in items):
        raise InvalidTask(f"{what} must be a list of strings: {items!r}")
    return items


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "task"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
