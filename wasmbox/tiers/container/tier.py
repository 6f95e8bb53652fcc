"""The container tier: each task in a fresh OCI container (crun, runc, or gVisor's runsc)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

from wasmbox._config import HostConfig
from wasmbox._lazy import Lazy, LazyMap
from wasmbox._owned import make_owned_dir, reclaim_owned
from wasmbox.errors import HostFailure, SandboxError, TierUnavailable
from wasmbox.lifecycle import Closeable, Deadline, process_alive, shielded
from wasmbox.models import TaskKind, TierName
from wasmbox.monitor import Monitor
from wasmbox.packages import sandbox_dirs
from wasmbox.policy import Plan
from wasmbox.tiers.base import Availability, Outcome, TierCapabilities, check_capabilities
from wasmbox.tiers.container import network, reaper
from wasmbox.tiers.container.bundle import (
    ROOTFS_PREFIX,
    Paths,
    RootSkeleton,
    Shape,
)
from wasmbox.tiers.container.cgroups import PARENT
from wasmbox.tiers.container.instance import ExecFailed, Instance, owner_pid
from wasmbox.tiers.container.pool import POOL_PREFIX, ContainerPool
from wasmbox.tiers.container.runs import STREAM_MODE, run_cold, run_pooled
from wasmbox.tiers.container.runtime import STATE_ROOT, Runtime, choose_runtime
from wasmbox.tiers.wasm.source_scan import imported_modules
from wasmbox.workspace import Workspace, remove_tree

PROBE_PREFIX = "wasmbox-probe-"


@dataclass(frozen=True)
class ContainerPrepared:
    """A plan ready to run: its runtime, root skeleton, bundle shape and pool (if pooled)."""

    plan: Plan
    runtime: Runtime
    skeleton: RootSkeleton
    shape: Shape
    pool: ContainerPool | None


CRUN = TierCapabilities(kinds=frozenset({TaskKind.COMMAND, TaskKind.PYTHON}), network=True,
                        capabilities=True, hidden_paths=True)
# Measured: runsc leaves the non-root task's permitted/effective capability sets empty (only
# bounding and inheritable carry the grant), and runs with --network=none here.
GVISOR = dataclasses.replace(CRUN, network=False, capabilities=False,
                             note="under gVisor: that needs crun or runc")


class ContainerTier(Closeable):
    """Runs command and Python tasks in OCI containers.

    `pool_size` > 0 keeps that many containers of each shape created ahead (growing up to
    `pool_max` under demand); `runtime` picks crun (default), runc or ``gvisor``.
    """

    name = TierName.CONTAINER
    capabilities = CRUN

    def __init__(self, pool_size: int = 0, runtime: str | None = None,
                 pool_max: int | None = None, *, config: HostConfig | None = None) -> None:
        """`config` says where staging dirs live (default: from the environment)."""
        self.config = config or HostConfig.from_env()
        self.pool_size = pool_size
        self.pool_max = pool_max
        self.default_runtime = runtime
        self._runtimes: LazyMap[str, Runtime] = LazyMap()
        self._skeleton: Lazy[RootSkeleton] = Lazy(self._make_root_skeleton)
        self._pools: LazyMap[tuple[str, Shape], ContainerPool] = LazyMap()

    # --- probing --------------------------------------------------------------------------

    def availability(self) -> Availability:
        """Whether the default runtime can run containers here, and which one it is."""
        return self.runtime_availability(self.default_runtime)

    def runtime_availability(self, runtime: str | None) -> Availability:
        """Availability of one runtime (``None``/crun/runc, or ``gvisor``). Never raises."""
        choice = choose_runtime(runtime)
        details = {"runtime": choice.name}
        if choice.binary is None:
            return Availability(self.name, False, choice.reason, details)
        if os.geteuid() != 0:
            return Availability(self.name, False, "the container tier needs root "
                                "(rootless containers are not supported)", details)
        try:
            found = self._runtime(runtime)
        except TierUnavailable as exc:
            return Availability(self.name, False, exc.reason, details)
        cgroups = found.cgroups
        details["binary"] = choice.binary
        details["cgroups"] = f"v{cgroups.version}"
        if found.private_namespace:
            details["mount_namespace"] = "private (v2 cgroup mounts hidden from the runtime)"
        missing = cgroups.missing_controllers()
        if missing:
            return Availability(self.name, False, "cgroup controllers not available to the "
                                f"runtime: {', '.join(missing)}", details)
        try:
            _smoke_test(found, self._root_skeleton(), str(self.config.workspace_root))
        except (SandboxError, OSError, ExecFailed) as exc:
            return Availability(self.name, False, f"{choice.name} cannot run a container "
                                f"here: {exc}", details)
        return Availability(self.name, True, f"{choice.name}: {choice.reason}", details)

    def leftovers(self, pid: int | None = None) -> list[str]:
        """Traces of containers that should not exist between runs: cgroups, runtime state,
        mounts and staging dirs of any wasmbox container tier (of process `pid` only, when
        given: names carry their owner's pid). Empty when all is clean."""
        runtimes = self._runtimes.values() or [self._runtime(self.default_runtime)]
        found: list[str] = []
        for runtime in runtimes:
            for parent in runtime.cgroups.parents():
                with contextlib.suppress(FileNotFoundError):
                    found += [f"cgroup {parent}/{e.name}" for e in os.scandir(parent)
                              if e.is_dir()]
            with contextlib.suppress(FileNotFoundError):
                found += [f"state {runtime.state_root}/{n}"
                          for n in os.listdir(runtime.state_root)]
            ours = (ROOTFS_PREFIX, POOL_PREFIX, PROBE_PREFIX, STATE_ROOT)
            found += [f"mount {line}" for line in runtime.mount_table().splitlines()
                      if any(mark in line for mark in ours)]
        root = str(self.config.workspace_root)
        skeleton = self._skeleton.peek()
        own = skeleton.path if skeleton is not None else None
        found += [f"dir {root}/{n}" for n in os.listdir(root)
                  if n.startswith((POOL_PREFIX, ROOTFS_PREFIX, PROBE_PREFIX))
                  and f"{root}/{n}" != own]
        found += [f"netns {path}" for path in network.bound_namespaces()]
        found += [f"pasta {pid}: {cmd}" for pid, cmd in network.pasta_processes()]
        if pid is not None:
            found = [trace for trace in found if f"-{pid}-" in trace]
        return found

    # --- running --------------------------------------------------------------------------

    def prepare(self, plan: Plan) -> ContainerPrepared:
        """Check the plan against the runtime's capabilities, resolve the runtime, build the
        root skeleton and start the pool for this shape (it fills behind).

        Raises `TierDeclined` for what the runtime cannot give (gVisor: network,
        capabilities) and `TierUnavailable` when the network tools are missing.
        """
        self._ensure_open()
        runtime = self._runtime(plan.task.runtime or self.default_runtime)
        gvisor = runtime.name == "runsc"
        check_capabilities(self.name, GVISOR if gvisor else self.capabilities, plan)
        if plan.network is not None:
            why = network.missing_tools() or network.unsupported(plan.network)
            if why is not None:
                raise TierUnavailable(str(self.name), why)
        if plan.task.kind is TaskKind.PYTHON:  # check (and unpack) packages before the run
            sandbox_dirs(plan.policy.python.packages, imported_modules(plan.task.source or ""))
        skeleton = self._root_skeleton()
        shape = _for_runtime(runtime, Shape.of(plan))
        pool = None
        # A networked task's namespace, pasta and filter are its own: never pooled.
        if self.pool_size > 0 and not gvisor and plan.network is None:
            pool = self._pool(runtime, shape, skeleton)
        return ContainerPrepared(plan, runtime, skeleton, shape, pool)

    def unsuitable(self, prepared: ContainerPrepared) -> str | None:
        """Never: what the container tier cannot serve, `prepare` declines."""
        return None

    def run(self, prepared: ContainerPrepared, workspace: Workspace, deadline: Deadline,
            monitor: Monitor) -> Outcome:
        """Run the task in a fresh container; every container, cgroup and mount is gone after."""
        self._ensure_open()
        t0 = time.perf_counter()
        plan, shape = prepared.plan, prepared.shape
        pooled = prepared.pool.take(shape) if prepared.pool is not None else None
        if pooled is not None:
            return run_pooled(plan, workspace, deadline, monitor, pooled, t0)
        return run_cold(plan, workspace, deadline, monitor, prepared.runtime,
                        prepared.skeleton, shape, t0)

    def prewarm(self, plan: Plan) -> ContainerPool | None:
        """Start the pool for `plan`'s shape now (None without pooling); it fills behind."""
        return self.prepare(plan).pool

    def _runtime(self, requested: str | None) -> Runtime:
        choice = choose_runtime(requested)

        def make() -> Runtime:
            self._ensure_open()
            reaper.become_subreaper()
            found = Runtime(choice)
            _sweep(found, str(self.config.workspace_root))
            return found

        return self._runtimes.get(choice.name, make)

    def _root_skeleton(self) -> RootSkeleton:
        return self._skeleton.get()

    def _make_root_skeleton(self) -> RootSkeleton:
        self._ensure_open()
        return RootSkeleton(str(self.config.workspace_root))

    def _pool(self, runtime: Runtime, shape: Shape, skeleton: RootSkeleton) -> ContainerPool:
        def make() -> ContainerPool:
            self._ensure_open()
            return ContainerPool(runtime, shape, skeleton, self.pool_size, self.pool_max)

        return self._pools.get((runtime.name, shape), make)

    def _release(self) -> None:
        pools = self._pools.take_all()
        runtimes = self._runtimes.take_all()
        skeleton = self._skeleton.take()
        for pool in pools:
            pool.close()
        for runtime in runtimes:
            runtime.close()
        if skeleton is not None:
            skeleton.remove()


def _sweep(runtime: Runtime, root: str) -> None:
    """Delete what processes that died without cleaning up left: their containers,
    cgroups and staging directories (names carry the owner's pid)."""
    def dead(name: str) -> bool:
        pid = owner_pid(name)
        return pid is not None and pid != os.getpid() and not process_alive(pid)

    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(runtime.state_root):
            if dead(name):
                with contextlib.suppress(SandboxError):
                    runtime.delete(name)
    for parent in runtime.cgroups.parents():
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(parent):
                if os.path.isdir(f"{parent}/{name}") and dead(name):
                    runtime.cgroups.remove(f"/{PARENT}/{name}")
    for prefix in (POOL_PREFIX, ROOTFS_PREFIX, PROBE_PREFIX):
        reclaim_owned(root, prefix)
    network.sweep(dead)


def _for_runtime(runtime: Runtime, shape: Shape) -> Shape:
    # gVisor's sentry and gofer threads live in the container's cgroup, and its kernel
    # answers to the profile differently: the bundle adapts both (see Shape.gvisor).
    if runtime.name == "runsc":
        return dataclasses.replace(shape, gvisor=True)
    return shape


def _smoke_test(runtime: Runtime, skeleton: RootSkeleton, root: str) -> None:
    """Run /bin/true in a default-shaped container; raises with the runtime's complaint."""
    path = make_owned_dir(root, PROBE_PREFIX)
    instance = Instance.fresh(runtime, path + "/bundle")
    try:
        paths = Paths(path + "/task", path + "/task/output", path + "/code")
        os.makedirs(paths.output_dir)
        os.mkdir(paths.code_dir)
        shape = _for_runtime(runtime, Shape(
            memory=256 << 20, cpus=1.0, pids=16, tmpfs=1 << 20, fsize=1 << 20,
            readonly_mounts=(), writable_mounts=()))
        instance.configure(shape=shape, skeleton=skeleton, paths=paths, args=["/bin/true"],
                           env={})
        err_path = path + "/stderr"
        fd = os.open(err_path, STREAM_MODE, 0o600)
        try:
            if runtime.name == "runsc":
                instance.run_foreground(fd, fd)
            else:
                instance.run_detached(fd, fd)
        except ExecFailed:
            with open(err_path, encoding="utf-8", errors="replace") as f:
                raise HostFailure(f.read().strip() or "the runtime failed") from None
        finally:
            os.close(fd)
        ended = instance.wait(Deadline(30.0), 0.1, lambda: None)
        if ended.wait_status is not None and ended.wait_status != 0:
            raise HostFailure(f"/bin/true ended with wait status {ended.wait_status}")
    finally:
        with shielded():
            instance.destroy()
            remove_tree(path)
