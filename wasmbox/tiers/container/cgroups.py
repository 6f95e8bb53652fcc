"""Cgroup v1/v2 detection and the metrics of one container's cgroup."""

from __future__ import annotations

import os
from dataclasses import dataclass

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT = "wasmbox"  # every container cgroup is /wasmbox/<container id>
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer", "blkio")


@dataclass(frozen=True, slots=True)
class CgroupLayout:
    """How cgroups are mounted here: v2 unified, or v1 (hybrid when a v2 tree sits beside)."""

    version: int
    hybrid: bool
    swap_accounting: bool
    root: str = CGROUP_ROOT  # where we read the hierarchy (maybe through a namespace fd)

    @classmethod
    def detect(cls, root: str = CGROUP_ROOT) -> CgroupLayout:
        """Probe the hierarchy mounted at `root`."""
        if os.path.exists(root + "/cgroup.controllers"):
            return cls(2, False, os.path.exists(root + "/memory.swap.max")
                       or _any_child_has(root, "memory.swap.max"), root)
        return cls(
            1,
            os.path.ismount(root + "/unified"),
            os.path.exists(root + "/memory/memory.memsw.limit_in_bytes"),
            root,
        )

    def missing_controllers(self) -> list[str]:
        """Controllers the limits need that this hierarchy does not offer."""
        needed = ("cpu", "memory", "pids")
        if self.version == 2:
            try:
                with open(self.root + "/cgroup.controllers", encoding="ascii") as f:
                    present = set(f.read().split())
            except OSError:
                present = set()
            return [c for c in needed if c not in present]
        return [c for c in (*needed, "cpuacct") if not os.path.isdir(f"{self.root}/{c}")]

    def dirs(self, path: str) -> list[str]:
        """Every directory the runtime creates for the absolute cgroup `path`."""
        if self.version == 2:
            return [self.root + path]
        return [f"{self.root}/{c}{path}" for c in _V1_CONTROLLERS
                if os.path.isdir(f"{self.root}/{c}")]

    def parents(self) -> list[str]:
        """The directories under which container cgroups are created."""
        return self.dirs("/" + PARENT)

    def metrics(self, path: str) -> dict[str, float]:
        """Usage counters of a live cgroup; absent counters are left out."""
        found: dict[str, float] = {}
        if self.version == 2:
            base = self.root + path
            stat = _keyed(base + "/cpu.stat")
            _put(found, "cpu_s", stat.get("usage_usec"), 1e-6)
            _put(found, "cpu_throttled_periods", stat.get("nr_throttled"), 1)
            _put(found, "cpu_throttled_s", stat.get("throttled_usec"), 1e-6)
            _put(found, "peak_memory_bytes", _number(base + "/memory.peak"), 1)
            events = _keyed(base + "/memory.events")
            _put(found, "oom_kills", events.get("oom_kill"), 1)
            _put(found, "memory_limit_hits", events.get("max"), 1)
            _put(found, "pids_peak", _number(base + "/pids.peak"), 1)
            _put(found, "pids_limit_hits", _keyed(base + "/pids.events").get("max"), 1)
            return found
        v1 = self.root
        _put(found, "cpu_s", _number(f"{v1}/cpuacct{path}/cpuacct.usage"), 1e-9)
        stat = _keyed(f"{v1}/cpu{path}/cpu.stat")
        _put(found, "cpu_throttled_periods", stat.get("nr_throttled"), 1)
        _put(found, "cpu_throttled_s", stat.get("throttled_time"), 1e-9)
        _put(found, "peak_memory_bytes",
             _number(f"{v1}/memory{path}/memory.max_usage_in_bytes"), 1)
        _put(found, "oom_kills", _keyed(f"{v1}/memory{path}/memory.oom_control").get("oom_kill"), 1)
        _put(found, "memory_limit_hits", _number(f"{v1}/memory{path}/memory.failcnt"), 1)
        _put(found, "pids_peak", _number(f"{v1}/pids{path}/pids.peak"), 1)
        _put(found, "pids_limit_hits", _keyed(f"{v1}/pids{path}/pids.events").get("max"), 1)
        return found

    def sample(self, path: str) -> tuple[int | None, float | None, float | None]:
        """Memory charged now, CPU seconds used and seconds throttled so far (cheap reads)."""
        if self.version == 2:
            stat = _keyed(f"{self.root}{path}/cpu.stat")
            cpu, throttled = stat.get("usage_usec"), stat.get("throttled_usec")
            scale = 1e-6
        else:
            cpu = _number(f"{self.root}/cpuacct{path}/cpuacct.usage")
            throttled = _keyed(f"{self.root}/cpu{path}/cpu.stat").get("throttled_time")
            scale = 1e-9
        return (
            self.memory_usage(path),
            None if cpu is None else cpu * scale,
            None if throttled is None else throttled * scale,
        )

    def memory_usage(self, path: str) -> int | None:
        """Bytes the cgroup is charged for now (page cache included)."""
        if self.version == 2:
            return _number(f"{self.root}{path}/memory.current")
        return _number(f"{self.root}/memory{path}/memory.usage_in_bytes")

    def remove(self, path: str) -> None:
        """Remove the cgroup directories of `path` that are still there (empty ones only)."""
        for d in self.dirs(path):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # still populated: the caller has killed it; leak checks will say so


def mounts_hiding_v1(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mounts to remove (top first) so the runtime sees the v1 controllers alone.

    crun 1.8 refuses a v2 tree beside v1 controllers (``/sys/fs/cgroup/unified``), and a
    cgroup2 mounted over the whole v1 tmpfs hides the controllers that hold the limits.
    """
    try:
        with open(mountinfo, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    stack: list[str] = []  # filesystem types mounted at CGROUP_ROOT, bottom first
    v1 = unified = False
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()[0] if right else ""
        if len(fields) < 5:
            continue
        point = fields[4]
        if point == CGROUP_ROOT:
            stack.append(fstype)
        elif point == CGROUP_ROOT + "/unified" and fstype == "cgroup2":
            unified = True
        elif point.startswith(CGROUP_ROOT + "/") and fstype == "cgroup":
            v1 = True
    if not v1:
        return []
    hide = [CGROUP_ROOT] * sum(1 for t in stack[1:] if t == "cgroup2") if stack[:1] == [
        "tmpfs"] else []
    if unified:
        hide.append(CGROUP_ROOT + "/unified")
    return hide


def _any_child_has(root: str, name: str) -> bool:
    try:
        return any(os.path.exists(f"{e.path}/{name}") for e in os.scandir(root) if e.is_dir())
    except OSError:
        return False


def _number(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: str) -> dict[str, int]:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _put(into: dict[str, float], key: str, value: int | None, scale: float) -> None:
    if value is not None:
        into[key] = value * scale
