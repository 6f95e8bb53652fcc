"""Internal: which CPUs the service's own threads run on (runner processes use them all).

The service process's threads (the event loop, the journal's writer, the dispatcher's
workers, and on the thread runner the runs themselves) take turns holding one GIL. Spread
over several cores, every hand-off of the GIL wakes a thread on another core (on a VM an
inter-processor interrupt and a wake from idle) and moves the interpreter's hot data between
caches: on the 2-core benchmark machine that was more than a third of the service's CPU per
hello task. Kept on one core, the same hand-offs are cheap, and GIL-bound threads could not
use a second core anyway. Runner processes (``runner = "processes"``), which run the guests,
keep every CPU the service was allowed, so a CPU-bound task still gets all of them.

``[service] cpus``:

- ``"auto"`` (default): with runner processes, the service's threads share one core (the
  lowest this process may use). On the thread runner the runs happen on the service's
  threads and need every core: nothing is pinned.
- ``"all"``: nothing is pinned.
- a list of CPU numbers: the service's threads run there (the thread runner's runs too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from wasmbox.errors import ConfigError
from wasmbox.service.config import Backend, RunnerKind, ServiceSettings

log = logging.getLogger("wasmbox.service")


@dataclass(frozen=True)
class Placement:
    """CPUs for the service's own threads, and for its runner processes (which inherit the
    affinity of the thread that starts them, so they set theirs back)."""

    service: frozenset[int]
    runners: frozenset[int]


def plan(settings: ServiceSettings, allowed: frozenset[int] | None = None) -> Placement | None:
    """Where the service's threads and runner processes run; None: leave them unpinned.

    `allowed`: the CPUs this process may use (default: its own affinity). Raises
    `ConfigError` for CPUs the process may not use.
    """
    if allowed is None:
        allowed = frozenset(os.sched_getaffinity(0))
    chosen = settings.cpus
    if chosen == "all":
        return None
    if chosen == "auto":
        processes = (settings.backend is Backend.THREADS
                     and settings.runner is RunnerKind.PROCESSES)
        if not processes or len(allowed) < 2:
            return None
        service = frozenset({min(allowed)})
    else:
        service = frozenset(chosen)
        outside = sorted(service - allowed)
        if outside:
            raise ConfigError(f"[service] cpus {outside} are not among the CPUs this process "
                              f"may use: {sorted(allowed)}")
    return Placement(service, allowed)


@contextmanager
def placed(settings: ServiceSettings) -> Iterator[Placement | None]:
    """Meanwhile, this thread (and every thread or process it starts) runs on the service's
    CPUs; its own affinity is restored after. Yields the placement (None: unpinned)."""
    placement = plan(settings)
    if placement is None:
        yield None
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, placement.service)
    log.info("service threads on CPU %s (runner processes on %s)",
             _cpus(placement.service), _cpus(placement.runners))
    try:
        yield placement
    finally:
        os.sched_setaffinity(0, before)


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))
