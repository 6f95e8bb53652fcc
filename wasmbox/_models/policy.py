"""Internal: what a policy allows — `Policy` and its sections, loaded from TOML.

Public through `wasmbox` and `wasmbox.models`; import from there.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, Field, ValidationError, model_validator

from wasmbox._models.kinds import (
    ISOLATION_ORDER,
    AnomalyRule,
    DenyAction,
    TierName,
    check_capability,
)
from wasmbox._models.network import NetworkPolicy
from wasmbox._models.units import Bytes, Frozen, KiB, MiB, Seconds
from wasmbox.errors import ConfigError


class Limits(Frozen):
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


class TimeoutPolicy(Frozen):
    """Wall-clock limits. ``run=None`` is only accepted with ``allow_unbounded``."""

    run: Seconds | None = 10.0
    kill_grace: Seconds = 0.5


class FilesystemPolicy(Frozen):
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


class OutputPolicy(Frozen):
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


class WasiPolicy(Frozen):
    """What a WASI module may import and which env names a task may set."""

    allowed_imports: frozenset[str] = SAFE_WASI_IMPORTS
    env_allow: tuple[str, ...] = ("*",)  # fnmatch patterns of env names a task may set
    env: dict[str, str] = Field(default_factory=dict)  # fixed env the policy injects
    require_sha256: bool = False


class MonitorPolicy(Frozen):
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


class PythonPolicy(Frozen):
    """Pure-Python packages (directories or wheels) that Python tasks may import, read-only."""

    packages: tuple[Path, ...] = ()


class Policy(Frozen):
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
