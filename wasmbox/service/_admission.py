"""Internal: what a task must pass before it is journaled: a valid module, a CPU budget.

A module is validated without compiling it, and the digests of valid ones are remembered. A
task reserves its largest possible charge (`max_charge`); `check_budget` admits it only if
that fits in what its token has not yet spent or reserved in the quota window.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict

import wasmtime

from wasmbox._lazy import Lazy
from wasmbox.errors import ModuleRejected
from wasmbox.policy import Plan
from wasmbox.service.store import TaskStore


class QuotaExceeded(Exception):
    """A token is over one of its quotas; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def max_charge(plan: Plan) -> float:
    """The most a run of `plan` can be charged: every CPU busy, or a worker held, until the
    deadline plus the kill grace. Infinite for a run without a timeout."""
    if plan.timeout is None:
        return math.inf
    return plan.timeout * max(1.0, plan.cpus) + plan.kill_grace


def validate_module(data: bytes, max_bytes: int, digest: bytes | None = None) -> None:
    """Refuse bytes that are not a WebAssembly module, without compiling them.

    Raises `ModuleRejected`. Validation is linear in the size, which is bounded first; the
    tier validates again (with its own engine's features) when it runs the task. Modules that
    passed are remembered by SHA-256 (`digest`, if the caller has it already).
    """
    if len(data) > max_bytes:
        raise ModuleRejected(f"the module is {len(data)} bytes, over {max_bytes}")
    digest = digest or hashlib.sha256(data).digest()
    with _valid_lock:
        if digest in _valid:  # the same bytes validated before: the verdict cannot change
            _valid.move_to_end(digest)
            return
    try:
        wasmtime.Module.validate(_engine.get(), data)
    except wasmtime.WasmtimeError as exc:
        lines = str(exc).strip().splitlines() or ["invalid"]
        raise ModuleRejected(f"not a valid WebAssembly module: {lines[0][:500]}") from None
    with _valid_lock:
        _valid[digest] = None
        while len(_valid) > VALID_CACHE_SIZE:
            _valid.popitem(last=False)


_engine: Lazy[wasmtime.Engine] = Lazy(wasmtime.Engine)
_valid_lock = threading.Lock()  # guards `_valid`
# SHA-256 digests of modules that validated (most recently used last); only valid ones are
# remembered, so a hostile client cannot fill it with anything it could not already submit.
VALID_CACHE_SIZE = 1024
_valid: OrderedDict[bytes, None] = OrderedDict()


def check_budget(
    store: TaskStore, token: str, need: float, budget: float, window: float, pending: float
) -> None:
    """Raise `QuotaExceeded` unless `need` more seconds fit in `token`'s `budget` over the
    last `window` seconds, counting what its runs were charged and what its queued and
    running tasks reserve (`pending`: admitted tasks not yet in the journal)."""
    now = time.time()
    charges = store.charges(token, now - window)
    spent = sum(charge for _, charge in charges)
    reserved = store.reserved(token) + pending
    excess = spent + reserved + need - budget
    if excess <= 1e-9:
        return
    retry, freed = 1.0, 0.0  # if only running tasks hold it, their end frees it
    for finished_at, charge in charges:
        freed += charge
        if freed >= excess:
            retry = max(1.0, finished_at + window - now)
            break
    raise QuotaExceeded(
        f"{spent:.2f} s charged and {reserved:.2f} s reserved of {budget:g} CPU seconds "
        f"in the last {window:g} s; this task reserves {need:g} s (its timeout times its CPUs "
        "plus the kill grace, at most the whole budget)", retry,
    )
