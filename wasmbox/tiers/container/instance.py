"""One container from create to delete: start, a bounded wait, kill, metrics, teardown."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wasmbox._procstat import stat_fields
from wasmbox.errors import HostFailure
from wasmbox.lifecycle import Deadline
from wasmbox.models import Status
from wasmbox.tiers.container import reaper
from wasmbox.tiers.container.bundle import Paths, RootSkeleton, Shape, make_config, write_config
from wasmbox.tiers.container.cgroups import PARENT
from wasmbox.tiers.container.runtime import Runtime

_FIRST_POLL = 0.001
_MAX_POLL = 0.02  # how stale the checks may get on a long run
_REPARENT_WAIT = 5.0

Check = Callable[[], "tuple[Status, str] | None"]  # a reason to stop the task, if any


def new_container_id() -> str:
    """A fresh container name, also its cgroup leaf; it names the owning process's pid so a
    later sweep can tell the containers of a dead process."""
    return f"wbx-{os.getpid()}-{uuid.uuid4().hex[:16]}"


def owner_pid(name: str) -> int | None:
    """The pid in a container or staging dir name made by this module, if there is one."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class ExecFailed(Exception):
    """The runtime could not start the task's program (not found, not executable)."""


@dataclass
class Ended:
    """How the container's init ended, and whether we stopped it."""

    wait_status: int | None
    stopped: Status | None = None
    reason: str | None = None


class Instance:
    """A container known to the runtime; `destroy()` removes every trace of it on any path."""

    def __init__(self, runtime: Runtime, container_id: str, bundle_dir: str,
                 cgroup_path: str) -> None:
        self.runtime = runtime
        self.id = container_id
        self.bundle_dir = bundle_dir
        self.cgroup_path = cgroup_path
        self.pid: int | None = None
        self._known = False  # the runtime may hold state for it
        self._proc: subprocess.Popen[bytes] | None = None  # runsc's foreground `run`
        self._status: int | None = None
        self.seccomp_digest: str | None = None  # set: keep the filter crun compiles for it

    @classmethod
    def fresh(cls, runtime: Runtime, bundle_dir: str,
              container_id: str | None = None) -> Instance:
        """A container not created yet: a new id (or `container_id`) and its own cgroup,
        ``/wasmbox/<id>``."""
        cid = container_id or new_container_id()
        return cls(runtime, cid, bundle_dir, f"/{PARENT}/{cid}")

    def configure(self, *, shape: Shape, skeleton: RootSkeleton, paths: Paths,
                  args: list[str], env: dict[str, str], netns: str | None = None,
                  resolv_conf: str | None = None) -> None:
        """Write the bundle's config.json (`bundle.make_config`) for this container's
        runtime and cgroup."""
        self.write_config(make_config(
            shape=shape, skeleton=skeleton, paths=paths, args=args, env=env,
            cgroups=self.runtime.cgroups, cgroup_path=self.cgroup_path, netns=netns,
            resolv_conf=resolv_conf,
        ))

    def write_config(self, config: dict[str, Any]) -> None:
        """Write the bundle's config.json, with the seccomp filter crun compiled before for
        the same profile when there is one (see `Runtime.reuse_seccomp`)."""
        self.seccomp_digest = self.runtime.reuse_seccomp(config)
        write_config(self.bundle_dir, config)

    def run_detached(self, stdout: int, stderr: int) -> None:
        """Create and start in one runtime call (crun/runc ``run --detach``)."""
        self._launch("run", "--detach", stdout=stdout, stderr=stderr)

    def create(self, stdout: int, stderr: int) -> None:
        """Create the container: its init waits inside the runtime until `start()`."""
        self._launch("create", stdout=stdout, stderr=stderr)

    def start(self) -> None:
        """Let a created container's init exec its program."""
        if self.runtime.name != "crun":
            self.runtime.call("start", self.id)
            return
        # `crun start` is exactly this (libcrun_status_write_exec_fifo): the init holds the
        # fifo open for reading and execs once a byte arrives; the fifo's absence marks the
        # container running. Doing it here saves a process spawn on the critical path.
        fifo = f"{self.runtime.state_root}/{self.id}/exec.fifo"
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise HostFailure(f"cannot start container {self.id}: {exc}") from exc
        try:
            os.unlink(fifo)
            os.write(fd, b"\0")
        except OSError as exc:
            raise HostFailure(f"cannot start container {self.id}: {exc}") from exc
        finally:
            os.close(fd)

    def run_foreground(self, stdout: int, stderr: int) -> None:
        """``run`` without detaching (runsc): the runtime process lives as long as the task."""
        self._known = True
        try:
            self._proc = self.runtime.spawn(
                ["run", "--bundle", self.bundle_dir, self.id], stdout=stdout, stderr=stderr
            )
        except OSError as exc:
            raise HostFailure(f"{self.runtime.name} run could not start: {exc}") from exc
        self.pid = self._proc.pid

    def _launch(self, *verb: str, stdout: int, stderr: int) -> None:
        pid_file = self.bundle_dir + "/pid"
        self._known = True
        try:
            proc = self.runtime.call(
                *verb, "--pid-file", pid_file, "--bundle", self.bundle_dir, self.id,
                stdout=stdout, stderr=stderr, check=False,
            )
        except BaseException:  # interrupted: an init the runtime made is ours to kill and reap
            with contextlib.suppress(OSError, ValueError):
                self._adopt(pid_file)
            raise
        if proc.returncode != 0:
            raise ExecFailed(f"{self.runtime.name} {verb[0]} exited {proc.returncode}")
        try:
            self._adopt(pid_file)
        except (OSError, ValueError) as exc:
            raise HostFailure(f"{self.runtime.name} left no pid file: {exc}") from exc
        if self.seccomp_digest is not None:
            self.runtime.keep_seccomp(self.seccomp_digest, self.id)

    def _adopt(self, pid_file: str) -> None:
        """Take the container init named in `pid_file` as ours to wait for."""
        with open(pid_file, "rb") as f:
            self.pid = int(f.read())
        reaper.claim(self.pid)

    def wait(self, deadline: Deadline, kill_grace: float,
             check: Check) -> Ended:
        """Wait for the init to exit; stop it at the deadline or when `check` says so."""
        if self._proc is not None:
            return self._wait_foreground(deadline, kill_grace, check)
        assert self.pid is not None
        fd = os.pidfd_open(self.pid)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            ended = _poll_until(poller, deadline, check)
            if ended.stopped is Status.TIMEOUT:
                self._signal(signal.SIGTERM)
                if not poller.poll(kill_grace * 1000):
                    self._signal(signal.SIGKILL)
            elif ended.stopped is not None:
                self._signal(signal.SIGKILL)
        finally:
            os.close(fd)
        ended.wait_status = self._reap()
        return ended

    def _wait_foreground(self, deadline: Deadline, kill_grace: float,
                         check: Check) -> Ended:
        assert self._proc is not None
        ended = Ended(None)
        interval = _FIRST_POLL
        while self._proc.poll() is None:
            if deadline.expired:
                ended.stopped, ended.reason = Status.TIMEOUT, "wall-clock deadline passed"
            elif (stop := check()) is not None:
                ended.stopped, ended.reason = stop
            if ended.stopped is not None:
                self.runtime.call("kill", self.id, "KILL", check=False)
                try:
                    self._proc.wait(max(kill_grace, 1.0))
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                break
            time.sleep(interval)
            interval = min(interval * 2, _MAX_POLL)
        rc = self._proc.returncode
        ended.wait_status = rc << 8 if rc >= 0 else -rc
        return ended

    def _signal(self, sig: signal.Signals) -> None:
        if self.pid is not None and self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _reap(self) -> int | None:
        if self.pid is None or self._proc is not None:
            return None
        if self._status is None:
            try:
                _, self._status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self._status = _reap_when_reparented(self.pid)
            reaper.release(self.pid)
        return self._status

    def destroy(self) -> None:
        """Kill what still runs, reap it, delete the container and its cgroups."""
        if self._proc is not None and self._proc.poll() is None:
            self.runtime.call("kill", self.id, "KILL", check=False)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        elif self.pid is not None and self._status is None:
            self._signal(signal.SIGKILL)
            self._reap()
        if self._proc is not None:
            reaper.release(self._proc.pid)
        if self._known:
            self.runtime.delete(self.id)
            self._known = False
        self.runtime.cgroups.remove(self.cgroup_path)
        reaper.reap_orphans()


def _poll_until(poller: select.poll, deadline: Deadline,
                check: Check) -> Ended:
    interval = _FIRST_POLL
    while True:
        remaining = deadline.remaining()
        timeout = interval if remaining is None else min(interval, remaining)
        if poller.poll(timeout * 1000):
            return Ended(None)
        if deadline.expired:
            return Ended(None, Status.TIMEOUT, "wall-clock deadline passed")
        stop = check()
        if stop is not None:
            return Ended(None, *stop)
        interval = min(interval * 2, _MAX_POLL)


def _reap_when_reparented(pid: int) -> int:
    """Wait status of a container init that is not (yet) our child.

    The runtime's helper process that forked the init can outlive the runtime command by a
    moment; the init is re-parented to us (the subreaper) only when that helper exits.
    """
    give_up = time.monotonic() + _REPARENT_WAIT
    while time.monotonic() < give_up:
        fields = stat_fields(pid)
        if len(fields) < 2 or not fields[1].isdigit():
            return 0xFF00  # gone: someone else reaped it; the status is unknown (exit 255)
        ppid = int(fields[1])
        if ppid == os.getpid():
            try:
                return os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return 0xFF00
        time.sleep(0.001)
    return 0xFF00
