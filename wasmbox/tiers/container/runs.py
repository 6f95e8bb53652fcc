"""One task in one container: cold (create and start now) or pooled (start a created one)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time

from wasmbox.errors import HostFailure
from wasmbox.lifecycle import Deadline, shielded
from wasmbox.models import Status, TaskKind
from wasmbox.monitor import Monitor, Sample
from wasmbox.policy import Plan
from wasmbox.runner import package_args, runner_source
from wasmbox.tiers.base import Outcome
from wasmbox.tiers.container.bundle import (
    CODE_MOUNT,
    GUEST_UID,
    Paths,
    RootSkeleton,
    Shape,
)
from wasmbox.tiers.container.cgroups import CgroupLayout
from wasmbox.tiers.container.instance import (
    Check,
    Ended,
    ExecFailed,
    Instance,
)
from wasmbox.tiers.container.network import TaskNetwork
from wasmbox.tiers.container.pool import Pooled, spec_script
from wasmbox.tiers.container.runtime import Runtime
from wasmbox.tiers.watch import RunWatch, Stop
from wasmbox.workspace import Workspace

GUEST_PYTHON = "/usr/bin/python3"
STREAM_MODE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def guest_argv(plan: Plan, code_dir: str) -> list[str]:
    """The program to run; Python tasks get the runner and their source staged in `code_dir`."""
    task = plan.task
    if task.kind is TaskKind.COMMAND:
        return list(plan.args)
    assert task.source is not None  # guaranteed by Task validation
    try:
        runner = runner_source()
    except OSError as exc:
        raise HostFailure(f"the Python runner is missing: {exc}") from exc
    with open(code_dir + "/runner.py", "wb") as f:
        f.write(runner)
    with open(code_dir + "/task.py", "w", encoding="utf-8") as f:
        f.write(task.source)
    for name in ("runner.py", "task.py"):
        os.chmod(f"{code_dir}/{name}", 0o444)
    return [GUEST_PYTHON, "-I", "-B", f"{CODE_MOUNT}/runner.py",
            *package_args(len(plan.policy.python.packages)), f"{CODE_MOUNT}/task.py", task.entry]


class CgroupProbe:
    """What a container run can measure, from its cgroup, for `RunWatch` samples.

    With `keep_metrics` every check also keeps the cgroup's counters: runsc removes the
    cgroup as it exits, so the last sample taken during the run is all there is after it.
    """

    def __init__(self, plan: Plan, cgroups: CgroupLayout, cgroup_path: str,
                 keep_metrics: bool = False) -> None:
        self.plan, self.cgroups, self.cgroup_path = plan, cgroups, cgroup_path
        self.keep_metrics = keep_metrics
        self.last_metrics: dict[str, float] = {}

    def __call__(self, base: Sample) -> Sample:
        memory, cpu, throttled = self.cgroups.sample(self.cgroup_path)
        return dataclasses.replace(base, memory_bytes=memory, memory_cap=self.plan.memory,
                                   cpu_s=cpu, throttled_s=throttled)

    def watch(self, deadline: Deadline, monitor: Monitor, view: Workspace) -> Check:
        """The run's `RunWatch`, keeping the cgroup's counters first when asked to."""
        watch = RunWatch(deadline, monitor, self, view)
        if not self.keep_metrics:
            return watch

        def check() -> Stop | None:
            # Merged, not replaced: while runsc tears the cgroup down, one controller's
            # files may be gone and another's still there (all counters only grow).
            self.last_metrics.update(self.cgroups.metrics(self.cgroup_path))
            return watch()

        return check


def run_cold(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
             runtime: Runtime, skeleton: RootSkeleton, shape: Shape, t0: float) -> Outcome:
    """Create and start a container now; a networked plan gets its own namespace, pasta and
    egress filter first, all released after the container is gone."""
    if plan.network is None:
        return _run_cold(plan, workspace, deadline, monitor, runtime, skeleton, shape, t0, None)
    try:
        net = TaskNetwork(plan.network, workspace.path + "/pasta.log")
    except OSError as exc:
        raise HostFailure(f"cannot set up the task's network: {exc}") from exc
    try:
        return _run_cold(plan, workspace, deadline, monitor, runtime, skeleton, shape, t0, net)
    finally:
        with shielded():
            net.close()


def _run_cold(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
              runtime: Runtime, skeleton: RootSkeleton, shape: Shape, t0: float,
              net: TaskNetwork | None) -> Outcome:
    bundle = workspace.path + "/bundle"  # host-only: beside task/, removed with the workspace
    code = bundle + "/code"
    instance = Instance.fresh(runtime, bundle)
    try:
        os.makedirs(code)
        args = guest_argv(plan, code)
        os.chown(workspace.output_dir, GUEST_UID, GUEST_UID)
        resolv = None
        text = net.resolv_conf() if net is not None else None
        if text is not None:
            resolv = bundle + "/resolv.conf"
            with open(resolv, "w", encoding="ascii") as f:
                f.write(text)
            os.chmod(resolv, 0o444)
        instance.configure(
            shape=shape, skeleton=skeleton, args=args, env=plan.env,
            paths=Paths(workspace.task_dir, workspace.output_dir, code),
            netns=net.path if net is not None else None, resolv_conf=resolv,
        )
    except OSError as exc:
        raise HostFailure(f"cannot stage the container bundle: {exc}") from exc
    metrics: dict[str, float] = {}
    teardown = 0.0
    try:
        out, err = open_streams(workspace.stdout_path, workspace.stderr_path)
        try:
            if runtime.name == "runsc":
                instance.run_foreground(out, err)
            else:
                instance.run_detached(out, err)
        finally:
            os.close(out)
            os.close(err)
        t1 = time.perf_counter()
        probe = CgroupProbe(plan, runtime.cgroups, instance.cgroup_path,
                            keep_metrics=runtime.name == "runsc")
        ended = instance.wait(deadline, plan.kill_grace, probe.watch(deadline, monitor, workspace))
        t2 = time.perf_counter()
        metrics = {**probe.last_metrics, **runtime.cgroups.metrics(instance.cgroup_path)}
        if net is not None:
            rx, tx = net.counters()
            metrics.update(net_rx_bytes=float(rx), net_tx_bytes=float(tx))
    except ExecFailed:
        return _exec_failed(plan, workspace, t0)
    finally:
        t3 = time.perf_counter()
        with shielded():
            instance.destroy()
        teardown = time.perf_counter() - t3
    outcome = _outcome(plan, workspace, ended, metrics, t1 - t0, t2 - t1,
                       gvisor=runtime.name == "runsc")
    outcome.extra["teardown_s"] = teardown
    return outcome


def run_pooled(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
               pooled: Pooled, t0: float) -> Outcome:
    # The container was created before this workspace existed: its /task is a staging dir
    # of its own, filled now and emptied back into the workspace when it ends.
    view = _workspace_view(workspace, pooled)
    metrics: dict[str, float] = {}
    try:
        try:
            shutil.copyfile(workspace.input_path, pooled.paths.task_dir + "/input.json")
            os.chmod(pooled.paths.task_dir + "/input.json", 0o444)
            args = guest_argv(plan, pooled.paths.code_dir)
            spec_script(pooled.paths.code_dir, args, plan.env)
        except OSError as exc:
            raise HostFailure(f"cannot stage a pooled container: {exc}") from exc
        pooled.instance.start()
        t1 = time.perf_counter()
        instance = pooled.instance
        probe = CgroupProbe(plan, instance.runtime.cgroups, instance.cgroup_path)
        ended = instance.wait(deadline, plan.kill_grace, probe.watch(deadline, monitor, view))
        t2 = time.perf_counter()
        metrics = pooled.instance.runtime.cgroups.metrics(pooled.instance.cgroup_path)
        t3 = time.perf_counter()
        with shielded():
            pooled.instance.destroy()
            pooled.hand_back(workspace.output_dir, workspace.stdout_path, workspace.stderr_path)
    finally:
        with shielded():
            pooled.destroy()
    teardown = time.perf_counter() - t3
    outcome = _outcome(plan, workspace, ended, metrics, t1 - t0, t2 - t1)
    outcome.extra.update(pooled=1.0, teardown_s=teardown)
    return outcome


def _workspace_view(workspace: Workspace, pooled: Pooled) -> Workspace:
    """A Workspace that reads a pooled container's staging dir, for the in-run checks.

    It owns nothing (it is never closed), so only the read-only methods may be used.
    """
    view = Workspace.__new__(Workspace)
    view.plan = workspace.plan
    view.path = pooled.path
    view.task_dir = pooled.paths.task_dir
    view.output_dir = pooled.paths.output_dir
    view.stdout_path = pooled.stdout_path
    view.stderr_path = pooled.stderr_path
    return view


def open_streams(stdout_path: str, stderr_path: str) -> tuple[int, int]:
    out = os.open(stdout_path, STREAM_MODE, 0o600)
    try:
        err = os.open(stderr_path, STREAM_MODE, 0o600)
    except BaseException:
        os.close(out)
        raise
    return out, err


def _exec_failed(plan: Plan, workspace: Workspace, t0: float) -> Outcome:
    # The runtime's complaint decides the status; it stays in the stderr file for the result.
    stderr, _ = workspace.read_stream(workspace.stderr_path, plan.stderr_bytes)
    message = stderr.decode(errors="replace").strip()
    if "not found" not in message and "ermission denied" not in message:
        raise HostFailure(f"the runtime could not start the container: {message}")
    return Outcome(
        status=Status.FAILED, exit_code=127, reason=message.splitlines()[-1] if message else None,
        startup_s=time.perf_counter() - t0,
    )


def _memory_exceeded(code: int | None, metrics: dict[str, float], limit: int,
                     gvisor: bool) -> bool:
    """Whether the task ended because its memory limit was hit.

    Under crun/runc the cgroup counts the OOM kill. Under gVisor the kernel's OOM killer
    takes the whole sandbox (the sentry holds the task's memory) and runsc exits 137; the
    last sample may predate the kill, so a peak at the limit, or hits on it, count too.
    """
    if metrics.get("oom_kills", 0) > 0:
        return True
    killed = code in (128 + signal.SIGKILL, -signal.SIGKILL)
    at_limit = (metrics.get("memory_limit_hits", 0) > 0
                or metrics.get("peak_memory_bytes", 0) >= limit)
    return gvisor and killed and at_limit


def _outcome(plan: Plan, workspace: Workspace, ended: Ended, metrics: dict[str, float],
             startup_s: float, run_s: float, gvisor: bool = False) -> Outcome:
    outcome = Outcome(status=Status.COMPLETED, startup_s=startup_s, run_s=run_s)
    ws = ended.wait_status
    code = os.waitstatus_to_exitcode(ws) if ws is not None else None
    flood = workspace.over_cap()
    if ended.stopped is not None:
        outcome.status, outcome.reason = ended.stopped, ended.reason
    elif flood is not None:
        outcome.status, outcome.reason = Status.OUTPUT_REJECTED, flood
    elif code == 0:
        outcome.exit_code = 0
    elif _memory_exceeded(code, metrics, plan.memory, gvisor):
        outcome.status = Status.MEMORY_EXCEEDED
        outcome.reason = f"the memory cgroup limit of {plan.memory} bytes was hit (OOM kill)"
        outcome.exit_code = code if code is not None and code > 0 else None
    elif code is not None and code > 0:
        outcome.status, outcome.exit_code = Status.FAILED, code
    elif code is not None:
        name = signal.Signals(-code).name
        outcome.status, outcome.trap = Status.CRASHED, f"signal {name}"
        outcome.reason = f"killed by {name}"
    cpu = metrics.pop("cpu_s", None)
    peak = metrics.pop("peak_memory_bytes", None)
    outcome.cpu_s = cpu
    outcome.peak_memory_bytes = int(peak) if peak is not None else None
    outcome.extra = metrics
    return outcome
