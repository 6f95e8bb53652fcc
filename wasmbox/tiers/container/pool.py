"""Containers created ahead of time, so `create` leaves the critical path.

A pooled container is created (``crun create``) with its own staging directory bound as
/task, /task/output and the code mount; its init is ``/bin/sh`` reading a spec script that is
written only when a task takes the container. After one task the container and its staging
directory are destroyed: nothing of one task is ever visible to another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading

from wasmbox.errors import SandboxError
from wasmbox.lifecycle import Closeable, shielded
from wasmbox.tiers.container.bundle import (
    CODE_MOUNT,
    GUEST_UID,
    Paths,
    RootSkeleton,
    Shape,
    make_config,
    write_config,
)
from wasmbox.tiers.container.cgroups import PARENT
from wasmbox.tiers.container.instance import ExecFailed, Instance, new_container_id
from wasmbox.tiers.container.runtime import Runtime
from wasmbox.workspace import remove_tree, workspace_root

SPEC = "spec.sh"
POOL_PREFIX = "wasmbox-pool-"
_log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def spec_script(code_dir: str, args: list[str], env: dict[str, str]) -> None:
    """Write the script a pooled container's init runs: set the env, exec the program."""
    lines = []
    odd = {k: v for k, v in env.items() if not _NAME.match(k)}
    for key, value in env.items():
        if key not in odd:
            lines.append(f"export {key}={shlex.quote(value)}")
    prefix = ""
    if odd:  # names the shell cannot export still reach the program through env(1)
        prefix = "env -- " + " ".join(shlex.quote(f"{k}={v}") for k, v in odd.items()) + " "
    lines.append("exec " + prefix + " ".join(shlex.quote(a) for a in args))
    path = f"{code_dir}/{SPEC}"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o444)


class Pooled:
    """One created, not yet started container and its staging directory."""

    def __init__(self, runtime: Runtime, shape: Shape, skeleton: RootSkeleton,
                 container_id: str) -> None:
        self.path = tempfile.mkdtemp(prefix=f"{POOL_PREFIX}{os.getpid()}-",
                                     dir=str(workspace_root()))
        self.paths = Paths(self.path + "/task", self.path + "/task/output", self.path + "/code")
        self.stdout_path = self.path + "/stdout"
        self.stderr_path = self.path + "/stderr"
        bundle = self.path + "/bundle"
        cgroup_path = f"/{PARENT}/{container_id}"
        self.instance = Instance(runtime, container_id, bundle, cgroup_path)
        try:
            os.makedirs(self.paths.output_dir)
            os.mkdir(self.paths.code_dir)
            os.chown(self.paths.output_dir, GUEST_UID, GUEST_UID)
            config = make_config(
                shape=shape, skeleton=skeleton, paths=self.paths, env={},
                args=["/bin/sh", f"{CODE_MOUNT}/{SPEC}"],
                cgroups=runtime.cgroups, cgroup_path=cgroup_path,
            )
            write_config(bundle, config)
            out = os.open(self.stdout_path, _FLAGS, 0o600)
            err = os.open(self.stderr_path, _FLAGS, 0o600)
            try:
                self.instance.create(out, err)
            finally:
                os.close(out)
                os.close(err)
        except BaseException:
            with shielded():
                self.destroy()
            raise

    def hand_back(self, output_dir: str, stdout_path: str, stderr_path: str) -> None:
        """Move what the (dead) container wrote into the task's workspace."""
        for entry in os.scandir(self.paths.output_dir):
            shutil.move(entry.path, f"{output_dir}/{entry.name}")
        for src, dst in ((self.stdout_path, stdout_path), (self.stderr_path, stderr_path)):
            shutil.move(src, dst)

    def destroy(self) -> None:
        """Delete the container and its staging directory."""
        try:
            self.instance.destroy()
        finally:
            if os.path.isdir(self.path):
                remove_tree(self.path)


class ContainerPool(Closeable):
    """Created containers of one shape, ready to start; `take()` never blocks.

    It keeps `min_size` ready and grows by one, up to `max_size`, each time a task finds it
    empty. `close()` deletes every container still waiting.
    """

    def __init__(self, runtime: Runtime, shape: Shape, skeleton: RootSkeleton,
                 min_size: int, max_size: int | None = None) -> None:
        self.runtime, self.shape, self.skeleton = runtime, shape, skeleton
        self.min_size = min_size
        self.max_size = max(min_size, max_size or min_size)
        self.size = min_size  # the current target
        self._ready: list[Pooled] = []
        self._cond = threading.Condition()
        self._failures = 0
        self._filler = threading.Thread(target=self._fill, name="wasmbox-pool", daemon=True)
        self._filler.start()

    def take(self) -> Pooled | None:
        """A ready container, or None when the pool is empty (the caller runs cold)."""
        with self._cond:
            if self._closed or not self._ready:
                self.size = min(self.size + 1, self.max_size)
                self._cond.notify()
                return None
            pooled = self._ready.pop(0)
            self._cond.notify()
            return pooled

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the pool is full (benchmarks, tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._ready) >= self.size or self._closed,
                                       timeout)

    def idle_memory(self) -> list[int]:
        """What each waiting container's cgroup is charged for (its idle cost)."""
        with self._cond:
            ready = list(self._ready)
        cgroups = self.runtime.cgroups
        return [m for p in ready if (m := cgroups.memory_usage(p.instance.cgroup_path)) is not None]

    @property
    def ready(self) -> int:
        """How many containers are waiting."""
        return len(self._ready)

    def _fill(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) < self.size)
                if self._closed:
                    return
            try:
                pooled = Pooled(self.runtime, self.shape, self.skeleton, new_container_id())
            except (SandboxError, OSError, ExecFailed) as exc:
                self._failures += 1
                _log.warning("container pool: cannot create a container: %s", exc)
                if self._failures >= 3:
                    return  # runs go cold; the reason is in the log
                continue
            with self._cond:
                if self._closed:
                    keep = False
                else:
                    self._ready.append(pooled)
                    keep = True
                self._cond.notify_all()
            if not keep:
                pooled.destroy()

    def _release(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._filler.join()
        with self._cond:
            ready, self._ready = self._ready, []
        for pooled in ready:
            with contextlib.suppress(SandboxError, OSError):
                pooled.destroy()
