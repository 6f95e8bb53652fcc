"""Service configuration: tokens, the policies each may use, quotas, limits and the back end.

```toml
[service]
backend = "threads"              # or "dask" (then: scheduler = "tcp://127.0.0.1:8786")
workers = 4                      # tasks run at once (threads, or in flight on the cluster)
runner = "processes"             # thread back end: run sandboxes in spawned runner
                                 # processes, or "threads" (on the worker threads)
runner_processes = 0             # runner processes (0: one per core)
cpus = "auto"                    # the service's own threads: "auto" (one core when runner
                                 # processes run the tasks), "all", or a list like [0]
max_body_bytes = "8MiB"          # larger requests get 413
max_wait = 30                    # longest long-poll, seconds
shutdown_grace = 30              # how long a shutdown waits for running tasks
db = "wasmbox-service.db"        # relative to this file
retention = "7d"                 # finished tasks and their files are deleted after this
module_retention = "1h"          # a module nobody submitted for this long is deleted
access_log = false               # one log line per request (costs ~5% of throughput)

[policies.default]               # inline policy fields ...
timeouts.run = "5s"
[policies.strict]
file = "policies/strict.toml"    # ... or a policy file, relative to this file

[tokens.alice]
secret = "s3cret"                # or secret_sha256 = "<hex digest>"
policies = ["default", "strict"] # the first one is used when a request names none
max_concurrent = 4               # queued + running tasks at once
cpu_seconds = 120                # seconds charged per window ...
window = 60                      # ... of this many seconds
```

A run is charged ``max(CPU seconds, wall seconds a worker was held)``, rejected runs too; a
task reserves its largest possible charge (timeout x CPUs + kill grace, at most the whole
budget) when it is admitted, and is refused with 429 if that does not fit.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from wasmbox.errors import ConfigError
from wasmbox.models import Bytes, MiB, Policy, Seconds, parse_duration

DAY = 86400.0


def _parse_age(value: Any) -> Any:
    """A duration as the library reads it, plus days: ``"7d"``."""
    if isinstance(value, str) and value.strip().lower().endswith("d"):
        days = value.strip()[:-1].strip()
        if not days.replace(".", "", 1).isdigit() or len(days) > 15:
            raise ValueError(f"not a duration: {value!r} (try '7d', '12h' or '30m')")
        return float(days) * DAY
    return parse_duration(value)


Age = Annotated[float, Field(gt=0), BeforeValidator(_parse_age)]


class Backend(StrEnum):
    """Where the service runs tasks."""

    THREADS = "threads"  # a thread pool in the service process
    DASK = "dask"  # a Dask distributed cluster


class RunnerKind(StrEnum):
    """Where the thread back end's workers run a task's sandbox."""

    PROCESSES = "processes"  # spawned runner processes (the service's GIL stays free)
    THREADS = "threads"  # on the worker thread itself, in the service process


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TokenConfig(_Model):
    """One bearer token: its secret, the policies it may use and its quotas."""

    secret: str | None = Field(default=None, repr=False)
    secret_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    policies: tuple[str, ...] = ("default",)
    max_concurrent: Annotated[int, Field(gt=0)] = 4
    cpu_seconds: Seconds | None = None
    window: Seconds = 60.0

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.secret is None) == (self.secret_sha256 is None):
            raise ValueError("a token needs exactly one of secret or secret_sha256")
        if not self.policies:
            raise ValueError("a token needs at least one policy")
        return self

    def matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented bearer token with this one."""
        digest = hashlib.sha256(presented.encode()).hexdigest()
        expected = self.secret_sha256 or hashlib.sha256((self.secret or "").encode()).hexdigest()
        return hmac.compare_digest(digest, expected)


class ServiceSettings(_Model):
    """The ``[service]`` table."""

    backend: Backend = Backend.THREADS
    scheduler: str | None = None
    workers: Annotated[int, Field(ge=0)] = 4
    runner: RunnerKind = RunnerKind.PROCESSES
    runner_processes: Annotated[int, Field(ge=0)] = 0
    # The CPUs of the service's own threads (see `wasmbox.service._placement`).
    cpus: Literal["auto", "all"] | Annotated[
        list[Annotated[int, Field(ge=0, le=4095)]],
        Field(min_length=1, max_length=4096)] = "auto"
    max_body_bytes: Bytes = 8 * MiB
    max_wait: Seconds = 30.0
    shutdown_grace: Seconds = 30.0
    db: Path = Path("wasmbox-service.db")
    retention: Age = 7 * DAY
    module_retention: Age = 3600.0
    access_log: bool = False

    @model_validator(mode="after")
    def _backend_has_scheduler(self) -> Self:
        if self.backend is Backend.DASK and not self.scheduler:
            raise ValueError("backend = 'dask' needs scheduler = '<address>'")
        return self


class ServiceConfig(_Model):
    """The whole service configuration; build one with `ServiceConfig.from_toml`."""

    service: ServiceSettings = ServiceSettings()
    policies: dict[str, Policy] = Field(default_factory=lambda: {"default": Policy()})
    tokens: dict[str, TokenConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tokens_name_known_policies(self) -> Self:
        for name, token in self.tokens.items():
            unknown = [p for p in token.policies if p not in self.policies]
            if unknown:
                raise ValueError(f"token {name!r} names unknown policies {unknown}")
        return self

    def authenticate(self, presented: str) -> str | None:
        """The name of the token whose secret is `presented`, or None."""
        found = None
        for name, token in self.tokens.items():
            # Compare with every token so the time taken does not say which one matched.
            if token.matches(presented) and found is None:
                found = name
        return found

    @classmethod
    def from_toml(cls, path: str | Path) -> ServiceConfig:
        """Load a configuration file; raises `ConfigError` naming the offending field."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read service config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path = Path()) -> ServiceConfig:
        """Build a configuration from parsed TOML; relative paths are taken from `base`."""
        data = dict(data)
        policies = {}
        for name, table in dict(data.get("policies", {"default": {}})).items():
            policies[name] = _policy(name, table, base)
        data["policies"] = policies
        service = dict(data.get("service", {}))
        if "db" in service:
            service["db"] = base / Path(service["db"])
        else:
            service["db"] = base / ServiceSettings().db
        data["service"] = service
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"service config: {_explain(exc)}") from exc


def _policy(name: str, table: Any, base: Path) -> Policy:
    if not isinstance(table, dict):
        raise ConfigError(f"policies.{name} must be a table")
    if "file" in table:
        if len(table) > 1:
            raise ConfigError(f"policies.{name}: give either file or inline fields, not both")
        return Policy.from_toml(base / Path(table["file"]))
    try:
        return Policy.model_validate({"name": name, **table})
    except ValidationError as exc:
        raise ConfigError(f"policies.{name}: {_explain(exc)}") from exc


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )
