"""The data wasmbox speaks: tasks, policies, results. Validation only, no behaviour.

Sizes accept integers (bytes) or strings such as ``"64M"``/``"64MiB"`` (binary) and ``"64MB"``
(decimal); durations accept seconds or strings such as ``"250ms"``, ``"5s"``, ``"2m"``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shlex
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from wasmbox.errors import ConfigError, InputRejected, InvalidTask, ModuleRejected

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Status(StrEnum):
    """How a run ended. Everything but COMPLETED is a guest fault or a guard that tripped."""

    COMPLETED = "completed"
    FAILED = "failed"  # the task exited non-zero (or raised, for Python tasks)
    TIMEOUT = "timeout"  # the wall-clock deadline passed
    OUT_OF_FUEL = "out_of_fuel"  # the CPU budget (wasm fuel) ran out
    MEMORY_EXCEEDED = "memory_exceeded"  # the guest hit its memory cap
    CRASHED = "crashed"  # a trap or signal other than the above
    OUTPUT_REJECTED = "output_rejected"  # outputs broke a cap, a filter or the output schema
    ANOMALY = "anomaly"  # a monitoring rule killed the task
    CANCELLED = "cancelled"  # the caller cancelled the run


class TierName(StrEnum):
    """Isolation tiers, lightest first. AUTO lets the sandbox choose."""

    AUTO = "auto"
    WASM = "wasm"
    CONTAINER = "container"
    VM = "vm"


ISOLATION_ORDER: tuple[TierName, ...] = (TierName.WASM, TierName.CONTAINER, TierName.VM)


class TaskKind(StrEnum):
    """What the task's code is."""

    WASM = "wasm"  # a WASI preview-1 command module
    PYTHON = "python"  # Python source run by an isolated interpreter
    COMMAND = "command"  # a native argv (container and VM tiers)


class DenyAction(StrEnum):
    """What an output deny pattern does when it matches."""

    REJECT = "reject"  # the whole run becomes OUTPUT_REJECTED
    REDACT = "redact"  # the match is replaced by ``[REDACTED]``


# --- sizes and durations ------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> Any:
    """Turn ``"64M"``, ``"64MiB"`` (binary) or ``"64MB"`` (decimal) into bytes."""
    if not isinstance(value, str):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (try 65536, '64K', '64MiB' or '64MB')")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)


def parse_duration(value: Any) -> Any:
    """Turn ``"250ms"``, ``"5s"``, ``"2m"`` into seconds."""
    if not isinstance(value, str):
        return value
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (try 5, '250ms', '5s' or '2m')")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return float(m.group(1)) * scale[(m.group(2) or "s").lower()]


# Field before the validator, so the JSON schema says exclusiveMinimum (not a raw "gt").
Bytes = Annotated[int, Field(gt=0), BeforeValidator(parse_size)]
Seconds = Annotated[float, Field(gt=0), BeforeValidator(parse_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- what a task asks for ------------------------------------------------------------------


class Resources(_Model):
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


class Task(_Model):
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
            if len(self.network) > _MAX_ENDPOINTS:
                raise ValueError(f"network: at most {_MAX_ENDPOINTS} endpoints")
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


# Linux capabilities (capability.h, 6.x); a name outside this list is a typo.
CAPABILITIES: frozenset[str] = frozenset("CAP_" + n for n in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
))


def check_capability(name: str) -> str:
    """`name` if it is a Linux capability spelled ``CAP_*``; raises ValueError otherwise."""
    if name not in CAPABILITIES:
        near = difflib.get_close_matches(str(name).upper(), sorted(CAPABILITIES), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"{name!r} is not a capability name like CAP_NET_BIND_SERVICE{hint}")
    return name


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


# --- what a policy allows ------------------------------------------------------------------


class Limits(_Model):
    """Maxima for every request; a request that is unset gets the maximum itself.

    ``fuel=None`` (no CPU budget) is only accepted when the policy sets ``allow_unbounded``.
    """

    fuel: Annotated[int, Field(gt=0)] | None = 20_000_000_000
    memory: Bytes = 256 * MiB
    stack: Bytes = 1 * MiB
    input_bytes: Bytes = 1 * MiB
    input_depth: Annotated[int, Field(gt=0, le=256)] = 64  # nesting of the task's input JSON
    args_bytes: Bytes = 64 * KiB
    stdout_bytes: Bytes = 1 * MiB
    stderr_bytes: Bytes = 1 * MiB
    table_elements: Annotated[int, Field(gt=0)] = 100_000
    instances: Annotated[int, Field(gt=0)] = 4
    cpus: Annotated[float, Field(gt=0)] = 1.0
    pids: Annotated[int, Field(gt=0)] = 64
    tmpfs: Bytes = 64 * MiB
    # Bytes a task may write (its outputs, and its /tmp, are each held to it on every tier);
    # None: only the output caps and tmpfs size apply.
    disk: Bytes | None = None


class TimeoutPolicy(_Model):
    """Wall-clock limits. ``run=None`` is only accepted with ``allow_unbounded``."""

    run: Seconds | None = 10.0
    kill_grace: Seconds = 0.5


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?$", re.IGNORECASE
)
_MAX_ENDPOINTS = 256


class Endpoint(_Model):
    """One parsed network endpoint: an address or network (``ip``/``cidr``) or a DNS ``name``,
    with a ``port`` (None: the policy's ``allowed_ports`` apply)."""

    text: str  # as written
    network: str | None = None  # an IPv4/IPv6 network ("192.0.2.1/32" for one address)
    name: str | None = None  # a DNS name (always with a port)
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``"host:port"``, ``"ip"``, ``"cidr"``, ``"name:port"`` or ``"[v6]:port"``;
        raises ValueError saying what is wrong."""
        if not isinstance(text, str) or not text or len(text) > 300 or text != text.strip():
            raise ValueError(f"endpoint {text!r} is not a host, ip, cidr or name:port")
        host, port = text, None
        if text.startswith("["):
            end = text.find("]")
            rest = text[end + 1:] if end > 0 else "?"
            if end < 0 or (rest and not rest.startswith(":")):
                raise ValueError(f"endpoint {text!r}: an IPv6 address in brackets is "
                                 "'[addr]' or '[addr]:port'")
            host, port = text[1:end], _port(rest[1:], text) if rest else None
            ipaddress.IPv6Address(_v6(host, text))
        elif text.count(":") == 1:
            host, _, raw = text.partition(":")
            port = _port(raw, text)
        if "/" in host:
            try:
                net = ipaddress.ip_network(host, strict=True)
            except ValueError as exc:
                raise ValueError(f"endpoint {text!r}: not a network ({exc})") from None
            return cls(text=text, network=str(net), port=port)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            if ":" in host or not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
                raise ValueError(f"endpoint {text!r} is not an ip, a cidr or a DNS name") from None
            if port is None:
                raise ValueError(f"endpoint {text!r} names a host without a port "
                                 "(write 'name:port')") from None
            return cls(text=text, name=host.lower().rstrip("."), port=port)
        return cls(text=text, network=str(ipaddress.ip_network(addr)), port=port)

    def covers(self, other: Endpoint, ports: tuple[int, ...]) -> bool:
        """Whether every address and port `other` names is inside this endpoint (with
        `ports` for a portless one; none listed means every port)."""
        if self.port is not None:
            port_ok = other.port == self.port
        else:  # this endpoint takes the policy's allowed_ports (none listed: every port)
            port_ok = not ports or other.port is None or other.port in ports
        if not port_ok:
            return False
        if self.name is not None or other.name is not None:
            return self.name == other.name
        assert self.network is not None and other.network is not None
        mine, theirs = ipaddress.ip_network(self.network), ipaddress.ip_network(other.network)
        return mine.version == theirs.version and theirs.subnet_of(mine)  # type: ignore[arg-type]


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"endpoint {text!r}: the port must be 1..65535")
    return int(raw)


def _v6(host: str, text: str) -> str:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
    return host


def parse_endpoints(values: Any) -> Any:
    """Endpoint strings to `Endpoint`s (validators); other values pass through."""
    if isinstance(values, str):
        raise ValueError("allowed_endpoints must be a list of strings")
    if isinstance(values, list | tuple) and len(values) > _MAX_ENDPOINTS:
        raise ValueError(f"at most {_MAX_ENDPOINTS} endpoints")
    if isinstance(values, list | tuple):
        return tuple(Endpoint.parse(v) if isinstance(v, str) else v for v in values)
    return values


Port = Annotated[int, Field(gt=0, lt=65536)]


class NetworkPolicy(_Model):
    """Network access (container tier). Off by default; the wasm tier never has a network.

    ``outbound`` is the switch; ``allowed_endpoints`` is exactly what a task may reach
    (``"host:port"``, ``"ip"``, ``"cidr"``, ``"name:port"``, ``"[v6]:port"``);
    ``allowed_ports`` applies to endpoints that name no port (none listed: every port);
    ``dns`` lets the task resolve names through one ``resolver`` (``"ip"`` or ``"ip:port"``,
    default the host's first nameserver). ``enabled`` is the deprecated name of ``outbound``.
    """

    outbound: bool = False
    allowed_endpoints: Annotated[tuple[Endpoint, ...], BeforeValidator(parse_endpoints)] = ()
    allowed_ports: tuple[Port, ...] = ()
    dns: bool = False
    resolver: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _deprecated_enabled(cls, data: Any) -> Any:
        # `[network] enabled` predates `outbound`; it means the same switch.
        if isinstance(data, dict) and "enabled" in data:
            data = dict(data)
            enabled = data.pop("enabled")
            if "outbound" in data and data["outbound"] != enabled:
                raise ValueError("enabled (deprecated) and outbound disagree; keep outbound")
            data["outbound"] = enabled
        return data

    @model_validator(mode="after")
    def _resolver_is_an_address(self) -> Self:
        if self.resolver is not None:
            ep = Endpoint.parse(self.resolver)
            if ep.network is None or "/" in self.resolver or (
                    ipaddress.ip_network(ep.network).num_addresses != 1):
                raise ValueError(f"resolver {self.resolver!r} must be 'ip' or 'ip:port'")
        return self

    @property
    def enabled(self) -> bool:
        """Deprecated name of `outbound`."""
        return self.outbound


class FilesystemPolicy(_Model):
    """Extra mounts beyond ``/task`` (guest path -> host path). Nothing else is visible."""

    readonly: dict[str, Path] = Field(default_factory=dict)
    writable: dict[str, Path] = Field(default_factory=dict)
    # Guest paths inside a mount above that the task must not see (masked in containers;
    # the wasm and VM tiers decline plans with any).
    hidden: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _hidden_inside_a_mount(self) -> Self:
        mounts = [*self.readonly, *self.writable]
        for path in self.hidden:
            if (not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/")
                    or "\0" in path or len(path) > 4096):
                raise ValueError(f"hidden path {path!r} must be an absolute path without '..'")
            inside = [m for m in mounts if path != m and
                      path.startswith(m.rstrip("/") + "/")]
            if not inside:
                raise ValueError(f"hidden path {path!r} lies inside no mount of "
                                 "[filesystem] readonly/writable (it would hide nothing)")
        return self

    @model_validator(mode="after")
    def _mounts_are_sane(self) -> Self:
        seen: set[str] = set()
        for guest in [*self.readonly, *self.writable]:
            if not guest.startswith("/") or ".." in guest.split("/"):
                raise ValueError(f"mount point {guest!r} must be an absolute path without '..'")
            # "/" is allowed: in the wasm tier the longest preopen prefix wins, so /task stays
            # ours (WASI tools expect a root preopen); container and VM plans refuse it.
            if guest == "/task" or guest.startswith("/task/"):
                raise ValueError(f"mount point {guest!r} would shadow the task directory")
            if guest in seen:
                raise ValueError(f"mount point {guest!r} is both read-only and writable")
            seen.add(guest)
        return self


class OutputPolicy(_Model):
    """Caps and filters applied to ``/task/output`` when a run ends."""

    max_files: Annotated[int, Field(gt=0)] = 64
    max_file_bytes: Bytes = 8 * MiB
    max_total_bytes: Bytes = 16 * MiB
    max_depth: Annotated[int, Field(gt=0)] = 8  # directories, enforced while the guest runs
    max_json_depth: Annotated[int, Field(gt=0, le=256)] = 64  # nesting of result.json
    max_json_bytes: Bytes = 4 * MiB  # size of result.json
    deny_patterns: tuple[str, ...] = ()
    on_deny: DenyAction = DenyAction.REJECT
    filter_streams: bool = True  # apply deny patterns to stdout/stderr too

    @model_validator(mode="after")
    def _caps_agree(self) -> Self:
        if self.max_file_bytes > self.max_total_bytes:
            raise ValueError("max_file_bytes cannot exceed max_total_bytes")
        for pattern in self.deny_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"deny pattern {pattern!r} is not a regex: {exc}") from None
        return self


_WASI_CALLS = """
    args_get args_sizes_get environ_get environ_sizes_get clock_res_get clock_time_get
    fd_advise fd_allocate fd_close fd_datasync fd_fdstat_get fd_fdstat_set_flags
    fd_fdstat_set_rights
    fd_filestat_get fd_filestat_set_size fd_filestat_set_times fd_pread fd_prestat_get
    fd_prestat_dir_name fd_pwrite fd_read fd_readdir fd_renumber fd_seek fd_sync fd_tell
    fd_write path_create_directory path_filestat_get path_filestat_set_times path_link
    path_open path_readlink path_remove_directory path_rename path_symlink
    path_unlink_file poll_oneoff proc_exit proc_raise random_get sched_yield
"""
# Every WASI preview-1 call except the sock_* family: the wasm tier has no network.
# (fd_fdstat_set_rights can only drop rights.)
SAFE_WASI_IMPORTS: frozenset[str] = frozenset(
    "wasi_snapshot_preview1." + name for name in _WASI_CALLS.split()
)


class WasiPolicy(_Model):
    """What a WASI module may import and which env names a task may set."""

    allowed_imports: frozenset[str] = SAFE_WASI_IMPORTS
    env_allow: tuple[str, ...] = ("*",)  # fnmatch patterns of env names a task may set
    env: dict[str, str] = Field(default_factory=dict)  # fixed env the policy injects
    require_sha256: bool = False


class AnomalyRule(StrEnum):
    """Monitoring rules; each fires at most once per run."""

    MEMORY_NEAR_CAP = "memory_near_cap"  # memory use at or above a fraction of the cap
    CPU_THROTTLED = "cpu_throttled"  # sustained CPU throttling (container cgroups)
    OUTPUT_FLOOD = "output_flood"  # output + stdio written faster than a rate
    FUEL_SPIKE = "fuel_spike"  # fuel burn rate jumps far above the run's own baseline
    STDERR_RUNAWAY = "stderr_runaway"  # stderr grows past a size


class MonitorPolicy(_Model):
    """What the monitor samples and when an anomaly is raised (or kills the task)."""

    enabled: bool = True
    interval: Seconds = 0.05
    memory_near_cap: Annotated[float, Field(gt=0, le=1)] = 0.9
    throttled_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    throttled_samples: Annotated[int, Field(gt=0)] = 3
    output_rate: Bytes = 64 * MiB  # bytes per second
    fuel_spike_factor: Annotated[float, Field(gt=1)] = 20.0
    stderr_bytes: Bytes = 256 * KiB
    kill_on: frozenset[AnomalyRule] = frozenset()  # rules that stop the task (ANOMALY)


class PythonPolicy(_Model):
    """Pure-Python packages (directories or wheels) that Python tasks may import, read-only."""

    packages: tuple[Path, ...] = ()


class Policy(_Model):
    """Everything a task may do. Safe by default; load one from TOML with `Policy.from_toml`."""

    name: str = "default"
    limits: Limits = Limits()
    timeouts: TimeoutPolicy = TimeoutPolicy()
    network: NetworkPolicy = NetworkPolicy()
    filesystem: FilesystemPolicy = FilesystemPolicy()
    output: OutputPolicy = OutputPolicy()
    wasi: WasiPolicy = WasiPolicy()
    python: PythonPolicy = PythonPolicy()
    monitor: MonitorPolicy = MonitorPolicy()
    allowed_tiers: frozenset[TierName] = frozenset(ISOLATION_ORDER)
    min_isolation: TierName = TierName.WASM
    allow_unbounded: bool = False
    # Capabilities a task may be granted (container tier), e.g. ["CAP_NET_BIND_SERVICE"].
    capabilities: frozenset[Annotated[str, AfterValidator(check_capability)]] = frozenset()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.allow_unbounded:
            if self.limits.fuel is None:
                raise ValueError("limits.fuel = unbounded needs allow_unbounded = true")
            if self.timeouts.run is None:
                raise ValueError("timeouts.run = unbounded needs allow_unbounded = true")
        if TierName.AUTO in self.allowed_tiers or not self.allowed_tiers:
            raise ValueError("allowed_tiers must list concrete tiers (wasm, container, vm)")
        if self.min_isolation is TierName.AUTO:
            raise ValueError("min_isolation must be a concrete tier")
        rank = ISOLATION_ORDER.index(self.min_isolation)
        if not any(ISOLATION_ORDER.index(t) >= rank for t in self.allowed_tiers):
            raise ValueError(
                f"min_isolation {self.min_isolation} excludes every allowed tier "
                f"({', '.join(sorted(self.allowed_tiers))})"
            )
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Load a policy file; raises `ConfigError` naming the offending field."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read policy {path}: {exc.strerror}") from exc
        return cls.from_toml_text(text, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "<policy>") -> Policy:
        """Parse a policy from TOML text; raises `ConfigError`."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_explain(exc, cls)}") from exc


def _explain(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per error, naming the field as a TOML key, with the nearest valid key for a
    typo (``memroy`` -> ``memory``)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "policy"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        line = f"{where}: {msg}"
        if err["type"] == "extra_forbidden" and model is not None:
            hint = _nearest_key(model, err["loc"])
            if hint:
                line += f" (did you mean {hint!r}?)"
        parts.append(line)
    return "; ".join(parts)


def _nearest_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The closest field name to the last part of `loc`, in the model the rest leads to."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    if fields is None:
        return None
    found = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
    return found[0] if found else None


# --- what comes back ----------------------------------------------------------------------


class Metrics(_Model):
    """Measurements of one run. Durations in seconds; None where a tier cannot measure."""

    startup_s: float = 0.0
    run_s: float = 0.0
    cleanup_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float | None = None
    fuel_consumed: int | None = None
    peak_memory_bytes: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_bytes: int = 0
    output_files: int = 0
    net_rx_bytes: int | None = None  # networked container tasks: the namespace's counters
    net_tx_bytes: int | None = None
    extra: dict[str, float] = Field(default_factory=dict)


class Event(_Model):
    """An anomaly the monitor saw during a run."""

    rule: AnomalyRule
    message: str
    at_s: float  # seconds since the run started
    killed: bool = False


class Result(_Model):
    """The typed outcome of a run. Guest faults are statuses here, never exceptions."""

    task_id: str
    run_id: str
    tier: TierName
    status: Status
    exit_code: int | None = None
    trap: str | None = None
    reason: str | None = None
    output: JsonValue = None
    files: dict[str, bytes] = Field(default_factory=dict, repr=False)
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    metrics: Metrics = Metrics()
    events: tuple[Event, ...] = ()
    escalated_from: TierName | None = None  # set when ``auto`` had to use a heavier tier
    escalation_reason: str | None = None
    warnings: tuple[str, ...] = ()  # one line each: requests the policy lowered, and why

    @property
    def ok(self) -> bool:
        """True when the task completed and its outputs passed every check."""
        return self.status is Status.COMPLETED

    @property
    def truncated(self) -> bool:
        """True when stdout or stderr hit its cap."""
        return self.stdout_truncated or self.stderr_truncated
