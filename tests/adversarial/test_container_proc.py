"""Threat: a task learns about the host through the kernel's /proc.

A container (crun, runc) gets a fresh procfs, but most of it describes the machine, not the
pid namespace: the kernel command line and config, kernel symbols, disks and partitions,
hardware and device lists (``/proc/misc`` names vsock), system-wide pressure, keyrings,
timers and the boot id. That is reconnaissance for an escape and a fingerprint of the host.
Those files read empty and those directories are empty in a container; gVisor serves a
/proc of its own that never shows the host's.
"""

from __future__ import annotations

import os

import pytest

from tests.container import conftest as container_fixtures
from wasmbox import Sandbox, Status, Task

pytestmark = pytest.mark.container

container_ready = container_fixtures.container_ready
native = container_fixtures.native
csb = container_fixtures.csb
make_csb = container_fixtures.make_csb
gvisor = container_fixtures.gvisor

HOST_FILES = (
    "/proc/cmdline", "/proc/config.gz", "/proc/version", "/proc/sys/kernel/random/boot_id",
    "/proc/kallsyms", "/proc/partitions", "/proc/diskstats", "/proc/swaps", "/proc/devices",
    "/proc/misc", "/proc/iomem", "/proc/ioports", "/proc/consoles", "/proc/interrupts",
    "/proc/softirqs", "/proc/buddyinfo", "/proc/zoneinfo", "/proc/key-users",
    "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats", "/proc/keys",
)
HOST_DIRS = ("/proc/pressure", "/proc/acpi", "/proc/driver", "/proc/scsi")

# One container reads them all: "<bytes> <path>" per file, "<entries> <path>" per directory.
_READ_ALL = (
    "for f in " + " ".join(HOST_FILES) + "; do "
    'echo "$(cat $f 2>/dev/null | wc -c) $f"; done; '
    "for d in " + " ".join(HOST_DIRS) + "; do "
    'echo "$(ls -A $d 2>/dev/null | wc -l) $d"; done'
)


def _host_has(path: str) -> bool:
    """Whether the host's /proc has something at `path` the test could see leak."""
    try:
        if os.path.isdir(path):
            return bool(os.listdir(path))
        with open(path, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


@pytest.fixture(scope="module")
def seen(csb: Sandbox) -> dict[str, int]:
    """Bytes (files) or entries (directories) a container task sees at each path."""
    r = csb.run(Task.command(["/bin/sh", "-c", _READ_ALL]))
    assert r.status is Status.COMPLETED, r.stderr
    return {path: int(size) for size, path in (line.split() for line in r.stdout.splitlines())}


@pytest.mark.parametrize("path", HOST_FILES + HOST_DIRS)
def test_host_proc_entries_show_nothing(seen: dict[str, int], path: str) -> None:
    if not _host_has(path):
        pytest.skip(f"this host has nothing at {path} to leak")
    assert seen[path] == 0


def test_system_wide_counters_tools_need_stay_readable(csb: Sandbox) -> None:
    # ps, free and language runtimes read these; masking them breaks tasks (documented risk).
    r = csb.run(Task.command(["/bin/sh", "-c", "head -c1 /proc/meminfo /proc/stat >/dev/null"
                              " && ps -o pid= -p 1"]))
    assert (r.status, r.stdout.strip()) == (Status.COMPLETED, "1"), r.stderr


def test_gvisor_proc_is_not_the_hosts(gvisor: Sandbox) -> None:
    r = gvisor.run(Task.command(["/bin/sh", "-c", "cat /proc/cmdline /proc/version 2>/dev/null"],
                            runtime="gvisor"))
    assert r.status is Status.COMPLETED, r.stderr
    for path in ("/proc/cmdline", "/proc/version"):
        with open(path, encoding="utf-8", errors="replace") as f:
            host = f.read().strip()
        assert host not in r.stdout
