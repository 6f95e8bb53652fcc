"""One exception tree for everything the *host* got wrong.

Guest faults (a task that loops, crashes, floods its output) are never exceptions: they are
`Result` statuses. What raises is the caller's mistake or the machine's: a policy that forbids
the request, an input that is not acceptable, a module that is not valid WebAssembly, a tier
that cannot run here.
"""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """Root of every error wasmbox raises."""


class ConfigError(SandboxError):
    """The host configuration is wrong (a contradictory policy, a bad engine setting)."""


class PolicyViolation(SandboxError):
    """The task asks for something the policy forbids; `rule` names the policy field."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # pickles across processes (Dask, workers)
        return (type(self), (self.rule, self.message))


class InputRejected(SandboxError):
    """The task input is not acceptable (not JSON, too large, fails its schema)."""


class InvalidTask(InputRejected):
    """A task was built from invalid fields (a wrong type, an unknown tier, a string argv)."""


class ModuleRejected(SandboxError):
    """The task code is not acceptable (malformed wasm, a forbidden import, a wrong hash)."""


class TierUnavailable(SandboxError):
    """A tier cannot run on this host; `reason` says why."""

    def __init__(self, tier: str, reason: str, *, declined_by_policy: bool = False) -> None:
        # A tier the policy rules out is not "unavailable": the message says what to change.
        super().__init__(reason if declined_by_policy
                         else f"tier {tier!r} is unavailable: {reason}")
        self.tier = tier
        self.reason = reason
        self.declined_by_policy = declined_by_policy

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unavailable, (type(self), self.tier, self.reason,
                                       self.declined_by_policy))


class TierDeclined(TierUnavailable, PolicyViolation):
    """A tier cannot give what the plan asks (its kind, network, capabilities, mounts).

    Both a `TierUnavailable` (``tier="auto"`` escalates past it) and a `PolicyViolation`
    (`rule` names the plan's field). Raised only by `tiers.base.check_capabilities`.
    """

    def __init__(self, tier: str, rule: str, reason: str) -> None:
        SandboxError.__init__(self, f"tier {tier!r} is unavailable: {reason}")
        self.tier, self.reason, self.declined_by_policy = tier, reason, False
        self.rule = rule
        self.message = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tier, self.rule, self.reason))


class SandboxClosed(SandboxError):
    """An object was used after `close()`."""


class HostFailure(SandboxError):
    """The host failed while running a task (I/O error, runtime crash): not the guest's fault."""


def _rebuild_unavailable(cls: type[TierUnavailable], tier: str, reason: str,
                         declined: bool) -> TierUnavailable:
    return cls(tier, reason, declined_by_policy=declined)
