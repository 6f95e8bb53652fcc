"""Internal: OCI bundles: one config.json per container over the shared read-only root skeleton
(`wasmbox.tiers.container._rootfs`, re-exported here)."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass
from typing import Any

from wasmbox.models import TaskKind
from wasmbox.packages import host_dirs
from wasmbox.policy import Plan
from wasmbox.runner import package_mounts
from wasmbox.tiers.container._rootfs import CODE_MOUNT as CODE_MOUNT
from wasmbox.tiers.container._rootfs import ROOTFS_PREFIX as ROOTFS_PREFIX
from wasmbox.tiers.container._rootfs import RootSkeleton as RootSkeleton
from wasmbox.tiers.container.cgroups import CgroupLayout
from wasmbox.tiers.container.seccomp import seccomp_profile

GUEST_UID = 65534
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
RESOLV_CONF = "/etc/resolv.conf"  # runner + task source (Python tasks), or the pooled spec
# A short CFS period spreads throttling evenly (a task gets its share every 20 ms, not in
# 100 ms bursts), so monitoring samples see it as sustained; the kernel minimum quota is 1 ms.
_CPU_PERIOD = 20_000
# Host threads of gVisor's sentry and gofer, on top of the task's limit in the host cgroup.
GVISOR_THREADS = 256
_MIB = 1 << 20
# What the kernel's /proc (and /sys, should it ever be mounted) would tell a task about the
# host: boot command line, kernel config and symbols, disks, hardware, devices (/proc/misc
# names vsock), system-wide pressure, keyrings, timers, the boot id. Files read empty
# (/dev/null is bound over them), directories are empty; missing ones are skipped.
# Left readable on purpose, because ps/top/free and language runtimes read them: meminfo,
# loadavg, stat, uptime, vmstat, cpuinfo (sysinfo(2) and uname(2) tell the same).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/cmdline", "/proc/config.gz", "/proc/version", "/proc/sys/kernel/random/boot_id",
    "/proc/kallsyms", "/proc/modules", "/proc/kcore", "/proc/iomem", "/proc/ioports",
    "/proc/partitions", "/proc/diskstats", "/proc/swaps", "/proc/devices", "/proc/misc",
    "/proc/consoles", "/proc/dma", "/proc/mtrr", "/proc/interrupts", "/proc/softirqs",
    "/proc/buddyinfo", "/proc/zoneinfo", "/proc/pagetypeinfo", "/proc/vmallocinfo",
    "/proc/slabinfo", "/proc/kpagecount", "/proc/kpageflags", "/proc/kpagecgroup",
    "/proc/keys", "/proc/key-users", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/kmsg",
    "/proc/acpi", "/proc/asound", "/proc/scsi", "/proc/pressure", "/proc/driver",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)
# Devices a sane program needs (null, zero, full, random, urandom, tty); the rest are denied.
_CHAR_DEVICES = ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0))


@dataclass(frozen=True, slots=True)
class Shape:
    """Everything of a container's config that a pooled container must agree on."""

    memory: int
    cpus: float
    pids: int
    tmpfs: int
    fsize: int
    readonly_mounts: tuple[tuple[str, str], ...]
    writable_mounts: tuple[tuple[str, str], ...]
    # Under gVisor the task's processes live in gVisor's kernel: the host cgroup holds the
    # sentry and gofer threads instead, so the task's limit is set inside (RLIMIT_NPROC).
    gvisor: bool = False
    capabilities: tuple[str, ...] = ()  # granted by the policy (sorted)
    hidden: tuple[str, ...] = ()  # policy paths masked inside the mounts
    # Host directories of python.packages (Python tasks), bound read-only in order at
    # wasmbox.runner.PACKAGES_MOUNT/N; wheels are unpacked ones.
    packages: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan: Plan) -> Shape:
        """The bundle shape a plan needs."""
        caps = plan.output
        fsize = max(caps.max_file_bytes, 4 * plan.stdout_bytes, 4 * plan.stderr_bytes,
                    plan.tmpfs) + _MIB
        return cls(
            memory=plan.memory,
            cpus=plan.cpus,
            pids=plan.pids,
            tmpfs=plan.tmpfs,
            fsize=fsize,
            readonly_mounts=tuple(sorted((g, str(h)) for g, h in plan.readonly_mounts.items())),
            writable_mounts=tuple(sorted((g, str(h)) for g, h in plan.writable_mounts.items())),
            capabilities=tuple(sorted(plan.capabilities)),
            hidden=tuple(sorted(plan.hidden_paths)),
            packages=(host_dirs(plan.policy.python.packages)
                      if plan.task.kind is TaskKind.PYTHON else ()),
        )


@dataclass(frozen=True, slots=True)
class Paths:
    """Host directories one container sees: /task, /task/output and the code mount."""

    task_dir: str
    output_dir: str
    code_dir: str


def make_config(
    *,
    shape: Shape,
    skeleton: RootSkeleton,
    paths: Paths,
    args: list[str],
    env: dict[str, str],
    cgroups: CgroupLayout,
    cgroup_path: str,
    netns: str | None = None,
    resolv_conf: str | None = None,
) -> dict[str, Any]:
    """The config.json of one container.

    `netns` is a network namespace to join (a networked task's, see `network.TaskNetwork`);
    without it the container gets a fresh one with only ``lo``. `resolv_conf` is a host
    file bound read-only over /etc/resolv.conf.

    What /proc/self/mountinfo still tells a crun/runc task: a bind mount shows its source's
    path inside the source filesystem, which no OCI runtime rewrites. Here that is the
    workspace and skeleton names (wasmbox's host pid, a per-process counter, random hex)
    relative to the workspace root's filesystem (``/dev/shm`` by default), the sources of
    policy mounts, and filesystem types and sizes. Host paths outside those are not shown.
    Under gVisor mountinfo is the sentry's own and names no host path.
    """
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=64k"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", f"size={shape.tmpfs}"]},
    ]
    for host, guest in skeleton.binds:
        mounts.append(_bind(host, guest, writable=False))
    mounts.append(_bind(paths.task_dir, "/task", writable=False))
    mounts.append(_bind(paths.output_dir, "/task/output", writable=True))
    mounts.append(_bind(paths.code_dir, CODE_MOUNT, writable=False))
    for guest, host in shape.readonly_mounts:
        skeleton.ensure_mountpoint(guest, os.path.isdir(host))
        mounts.append(_bind(host, guest, writable=False))
    for guest, host in shape.writable_mounts:
        skeleton.ensure_mountpoint(guest, os.path.isdir(host))
        mounts.append(_bind(host, guest, writable=True))
    for guest, host in zip(package_mounts(len(shape.packages)), shape.packages, strict=True):
        skeleton.ensure_mountpoint(guest, True)
        mounts.append(_bind(host, guest, writable=False))
    if shape.gvisor:
        mounts += _hidden_mounts(shape)
    if resolv_conf is not None:
        skeleton.ensure_mountpoint(RESOLV_CONF, False)
        mounts.append(_bind(resolv_conf, RESOLV_CONF, writable=False))
    namespaces: list[dict[str, str]] = [
        {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    if netns is not None:
        namespaces[1]["path"] = netns
    caps = list(shape.capabilities)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": GUEST_UID, "gid": GUEST_UID, "additionalGids": []},
            "args": args,
            "env": _environment(env),
            "cwd": "/task",
            # Exactly the granted set; ambient so that the (non-root) task's exec keeps it.
            # Inheritable too: the kernel keeps an ambient capability only while it is
            # both permitted and inheritable.
            "capabilities": {k: list(caps) for k in
                             ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": _rlimits(shape),
            "noNewPrivileges": True,
            "oomScoreAdj": 1000,
        },
        "root": {"path": skeleton.path, "readonly": True},
        "hostname": "wasmbox",
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup_path,
            "resources": _resources(shape, cgroups),
            "namespaces": namespaces,
            "seccomp": seccomp_profile(gvisor=shape.gvisor),
            # The policy's hidden paths are masked like /proc's: an empty read-only tmpfs
            # over a directory, /dev/null over a file (mounts are made before the masks).
            "maskedPaths": [*MASKED_PATHS, *shape.hidden],
            "readonlyPaths": list(READONLY_PATHS),
            "rootfsPropagation": "private",
        },
    }


def _hidden_mounts(shape: Shape) -> list[dict[str, Any]]:
    """Explicit masks for the policy's hidden paths (runsc applies maskedPaths to /proc
    only): an empty read-only tmpfs over a directory, /dev/null over anything else."""
    mounts: list[dict[str, Any]] = []
    sources = sorted([*shape.readonly_mounts, *shape.writable_mounts],
                     key=lambda m: len(m[0]), reverse=True)
    for hidden in shape.hidden:
        for guest, host in sources:
            if hidden.startswith(guest.rstrip("/") + "/"):
                target = host + hidden[len(guest.rstrip("/")):]
                break
        else:
            continue  # validated at load: every hidden path lies inside a mount
        if os.path.isdir(target):
            mounts.append({"destination": hidden, "type": "tmpfs", "source": "tmpfs",
                           "options": ["ro", "nosuid", "nodev", "noexec", "size=4k",
                                       "mode=755"]})
        elif os.path.lexists(target):
            mounts.append(_bind("/dev/null", hidden, writable=False))
    return mounts


def write_config(bundle_dir: str, config: dict[str, Any]) -> None:
    """Write config.json into `bundle_dir` (created if missing)."""
    os.makedirs(bundle_dir, exist_ok=True)
    with open(bundle_dir + "/config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, separators=(",", ":"))


def _bind(host: str, guest: str, *, writable: bool) -> dict[str, Any]:
    options = ["rbind", "nosuid", "nodev", "rw" if writable else "ro"]
    if writable:
        options.append("noexec")
    return {"destination": guest, "type": "bind", "source": host, "options": options}


def _environment(env: dict[str, str]) -> list[str]:
    merged = {"PATH": GUEST_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", **env}
    return [f"{k}={v}" for k, v in merged.items()]


def _rlimits(shape: Shape) -> list[dict[str, Any]]:
    wanted = {
        "RLIMIT_NOFILE": 1024,
        "RLIMIT_CORE": 0,
        "RLIMIT_MEMLOCK": 64 * 1024,
        # A single file (stdout included) cannot grow past what the caps could ever accept.
        "RLIMIT_FSIZE": shape.fsize,
        "RLIMIT_STACK": 8 * _MIB,
    }
    if shape.gvisor:
        # gVisor counts processes per user inside its own kernel, i.e. per sandbox; the host
        # kernel counts uid 65534 machine-wide, so crun/runc rely on the pids cgroup alone.
        wanted["RLIMIT_NPROC"] = shape.pids
    limits = []
    for name, value in wanted.items():
        _, hard = resource.getrlimit(getattr(resource, name))
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        limits.append({"type": name, "soft": value, "hard": value})
    return limits


def _resources(shape: Shape, cgroups: CgroupLayout) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    devices += [{"allow": True, "type": "c", "major": ma, "minor": mi, "access": "rwm"}
                for ma, mi in _CHAR_DEVICES]
    memory: dict[str, Any] = {"limit": shape.memory}
    if cgroups.swap_accounting:
        memory["swap"] = shape.memory  # memory + swap = memory: no swap at all
    if cgroups.version == 1:
        memory["swappiness"] = 0
    return {
        "devices": devices,
        "memory": memory,
        "cpu": {
            "quota": max(1000, int(shape.cpus * _CPU_PERIOD)),
            "period": _CPU_PERIOD,
            "shares": max(2, int(1024 * shape.cpus)),
        },
        "pids": {"limit": shape.pids + (GVISOR_THREADS if shape.gvisor else 0)},
    }
