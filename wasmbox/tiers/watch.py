"""Internal: the one in-run check every tier uses: the deadline (and cancellation),
monitoring samples, and the output caps, in that order; the first reason to stop is kept.

The tiers differ only in how they wait (wasm: the epoch ticker calls the watch; container:
a pidfd poll; VM: the serial reader's exit event, through `RunWatch.wait`) and in what they
can measure (the `probe` fills a `Sample` in).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from wasmbox.lifecycle import Deadline
from wasmbox.models import Status
from wasmbox.monitor import Monitor, Sample

if TYPE_CHECKING:
    from wasmbox.workspace import Workspace

DEADLINE_PASSED = "wall-clock deadline passed"


class Stop(NamedTuple):
    """Why a running guest is stopped: the status it ends with and the reason."""

    status: Status
    reason: str


Probe = Callable[[Sample], Sample]  # adds what a tier can measure to the watch's sample


class RunWatch:
    """Decides, each time it is called, whether a guest may go on; returns a `Stop` or None.

    `view` is the directory the guest writes (output and stream caps, output volume); None
    when the host cannot see it while the guest runs (a VM). `grace` lets a guest that keeps
    its own timer report its timeout first; a cancelled run stops at once.
    """

    __slots__ = ("deadline", "grace", "monitor", "probe", "stopped", "view")

    def __init__(self, deadline: Deadline, monitor: Monitor, probe: Probe | None = None,
                 view: Workspace | None = None, *, grace: float = 0.0) -> None:
        self.deadline = deadline
        self.monitor = monitor
        self.probe = probe
        self.view = view
        self.grace = grace
        self.stopped: Stop | None = None

    def __call__(self) -> Stop | None:
        if self.stopped is None:
            self.stopped = self._check()
        return self.stopped

    def reason(self) -> str | None:
        """The stop reason alone (the wasm watchdog's callback shape)."""
        stop = self()
        return None if stop is None else stop.reason

    def _check(self) -> Stop | None:
        deadline = self.deadline
        if deadline.cancelled or time.monotonic() >= deadline.at + self.grace:
            return Stop(Status.TIMEOUT, DEADLINE_PASSED)
        if self.monitor.due():
            reason = self.monitor.observe(self.sample())
            if reason is not None:
                return Stop(Status.ANOMALY, reason)
        if self.view is not None:
            reason = self.view.over_cap()
            if reason is not None:
                return Stop(Status.OUTPUT_REJECTED, reason)
        return None

    def sample(self) -> Sample:
        """One observation of the running guest: output volume here, the rest by `probe`."""
        base = Sample(at_s=self.monitor.elapsed())
        if self.view is not None:
            stdout, stderr = self.view.stream_sizes()
            base = Sample(at_s=base.at_s, output_bytes=self.view.output_bytes() + stdout + stderr,
                          stderr_bytes=stderr)
        return base if self.probe is None else self.probe(base)

    def wait(self, done: Callable[[float], bool], step: float) -> Stop | None:
        """Call ``done(timeout)`` (it blocks up to `timeout` seconds, True once the guest
        ended) until it says so, checking between calls; returns the `Stop`, or None when
        the guest ended by itself."""
        while True:
            end = self.deadline.at + self.grace
            left = step if math.isinf(end) else max(0.0, end - time.monotonic())
            if done(min(step, left)):
                return None
            stop = self()
            if stop is not None:
                return stop
