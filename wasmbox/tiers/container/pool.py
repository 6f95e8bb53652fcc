"""Containers created ahead of time, so `create` leaves the critical path.

A pooled container is created (``crun create``) with its own staging directory bound as
/task, /task/output and the code mount; its init is ``/bin/sh`` reading a spec script that is
written only when a task takes the container. After one task the container and its staging
directory are destroyed: nothing of one task is ever visible to another. Keeping them ready
(refill, shapes, counting, cleanup) is `wasmbox.pool.Pool`'s job; this module only says how
a pooled container is made, checked and destroyed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil

from wasmbox._owned import make_owned_dir
from wasmbox._procstat import stat_fields
from wasmbox.lifecycle import shielded
from wasmbox.models import TierName
from wasmbox.pool import Pool
from wasmbox.tiers.container.bundle import (
    CODE_MOUNT,
    GUEST_UID,
    Paths,
    RootSkeleton,
    Shape,
)
from wasmbox.tiers.container.instance import Instance, new_container_id
from wasmbox.tiers.container.runtime import Runtime
from wasmbox.workspace import remove_tree

SPEC = "spec.sh"
POOL_PREFIX = "wasmbox-pool-"
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
        # Beside the root skeleton: under the tier's workspace root.
        self.path = make_owned_dir(os.path.dirname(skeleton.path), POOL_PREFIX)
        self.paths = Paths(self.path + "/task", self.path + "/task/output", self.path + "/code")
        self.stdout_path = self.path + "/stdout"
        self.stderr_path = self.path + "/stderr"
        bundle = self.path + "/bundle"
        self.instance = Instance.fresh(runtime, bundle, container_id)
        try:
            os.makedirs(self.paths.output_dir)
            os.mkdir(self.paths.code_dir)
            os.chown(self.paths.output_dir, GUEST_UID, GUEST_UID)
            self.instance.configure(shape=shape, skeleton=skeleton, paths=self.paths, env={},
                                    args=["/bin/sh", f"{CODE_MOUNT}/{SPEC}"])
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

    def waiting(self) -> bool:
        """Whether the container's init still waits for its task (it may have been killed)."""
        pid = self.instance.pid
        fields = stat_fields(pid) if pid is not None else []
        return bool(fields) and fields[0] not in ("Z", "X")

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


class ContainerPool(Pool[Shape, Pooled]):
    """Created containers of one runtime and shape, ready to start; `take` never blocks.

    It keeps `min_size` ready and grows by one, up to `max_size`, each time a task finds it
    empty. `close()` deletes every container still waiting.
    """

    def __init__(self, runtime: Runtime, shape: Shape, skeleton: RootSkeleton,
                 min_size: int, max_size: int | None = None) -> None:
        self.runtime, self.shape, self.skeleton = runtime, shape, skeleton
        super().__init__(TierName.CONTAINER.value, min_size, self._create, Pooled.destroy,
                         usable=Pooled.waiting, grow_to=max_size)
        self.warm(shape)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the pool is full (benchmarks, tests); False on timeout."""
        return self.wait_filled(timeout)

    def idle_memory(self) -> list[int]:
        """What each waiting container's cgroup is charged for (its idle cost)."""
        cgroups = self.runtime.cgroups
        return [m for p in self.idle_items()
                if (m := cgroups.memory_usage(p.instance.cgroup_path)) is not None]

    def _create(self, shape: Shape) -> Pooled:
        return Pooled(self.runtime, shape, self.skeleton, new_container_id())
