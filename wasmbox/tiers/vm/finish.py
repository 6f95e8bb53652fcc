"""Internal: the end of a VM run: the exit line awaited under the run's deadline and monitor,
then the outcome and the outputs read from the stopped guest."""

from __future__ import annotations

import dataclasses
import tarfile
import time

from wasmbox.lifecycle import Deadline
from wasmbox.models import Status
from wasmbox.monitor import Monitor, Sample
from wasmbox.policy import Plan
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.vm.collect import classify as _classify
from wasmbox.tiers.vm.collect import unpack as _unpack
from wasmbox.tiers.vm.machine import ExitLine, Machine
from wasmbox.tiers.watch import RunWatch
from wasmbox.workspace import Workspace

_TAIL_LINES = 4


def finish(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
           machine: Machine, kvm: bool | None, t0: float, startup: float) -> Outcome:
    """Wait for `machine`'s exit line and read the outcome and the outputs it shipped."""
    line, anomaly = _wait(machine, monitor, deadline, max(plan.kill_grace, 1.0))
    outcome = Outcome(status=Status.COMPLETED, startup_s=startup)
    outcome.run_s = time.monotonic() - t0 - startup
    outcome.extra["guest_memory_mib"] = float(machine.shape.memory_mib)
    outcome.extra["kvm"] = 1.0 if kvm else 0.0
    outcome.extra["restored"] = 1.0 if machine.restored else 0.0
    if machine.ready_at is not None:  # boot or restore: QEMU start until it took tasks
        outcome.extra["machine_ready_s"] = machine.ready_at - machine.started
    rss, cpu = machine.rss_bytes(), machine.cpu_seconds()
    if rss is not None:
        outcome.extra["qemu_rss_bytes"] = float(rss)
    if cpu is not None and machine.ready_cpu_s is not None:
        # QEMU's CPU time split at the ready marker: the boot or restore, then the task.
        outcome.extra["qemu_ready_cpu_s"] = machine.ready_cpu_s
        outcome.extra["qemu_task_cpu_s"] = max(0.0, cpu - machine.ready_cpu_s)
    if anomaly is not None:
        outcome.status, outcome.reason = Status.ANOMALY, anomaly
        return outcome
    if line is None:
        if machine.alive or deadline.expired:
            outcome.status, outcome.reason = Status.TIMEOUT, "wall-clock deadline passed"
        else:
            outcome.status = Status.CRASHED
            outcome.reason = crash_report(machine)
        return outcome
    _classify(outcome, line, plan)
    if not line.flags & {"ship", "empty"}:  # "empty": the guest had nothing to ship
        # The guest synced its output disk before printing the line; stopped, it cannot
        # write it any more. With nothing to read, the guest is stopped after the result.
        machine.stop()
        try:
            _unpack(machine.output_image, workspace, plan)
        except (tarfile.TarError, OSError) as exc:
            outcome.status = Status.OUTPUT_REJECTED
            outcome.reason = f"the output disk is unreadable: {exc}"
    return outcome


def crash_report(machine: Machine) -> str:
    """Why a guest that never reported is gone, for diagnosis: how QEMU ended, what it said
    on stderr, the guest kernel's panic line if it printed one, and the console's last
    lines (the guest's own words: quoted, cut short)."""
    lines = machine.serial_tail(16384).strip().splitlines()
    panic = next((line[:200] for line in lines if "Kernel panic" in line), None)
    tail = [line[:200] for line in lines[-_TAIL_LINES:]]
    errors = machine.qemu_errors()[-300:]
    return (f"the guest stopped without reporting: {machine.exit_status()}"
            f"{'; QEMU said ' + repr(errors) if errors else ''}"
            f"{'; ' + repr(panic) if panic else ''}; console ended {tail!r}")


def _wait(machine: Machine, monitor: Monitor, deadline: Deadline,
          grace: float) -> tuple[ExitLine | None, str | None]:
    """Wait for the exit line, sampling QEMU for the monitor; (line, anomaly reason).

    The guest keeps its own timer, so the host waits `grace` past the deadline for its
    report; a cancelled run stops the guest at once (within a step, at most 100 ms)."""
    def probe(base: Sample) -> Sample:
        # From outside the guest only QEMU itself is visible: its CPU time is the task's
        # plus the guest kernel's; its RSS is not the task's memory, so none is reported.
        return dataclasses.replace(base, cpu_s=machine.cpu_seconds())

    step = min(monitor.policy.interval, 0.1) if monitor.policy.enabled else 0.1
    watch = RunWatch(deadline, monitor, probe, grace=grace)
    stop = watch.wait(lambda t: machine.wait_exit(t) is not None or not machine.alive, step)
    if stop is not None and (deadline.cancelled or stop.status is Status.ANOMALY):
        machine.stop()
    line = machine.wait_exit(0.0)
    return line, stop.reason if stop is not None and stop.status is Status.ANOMALY else None
