"""Soak: thousands of mixed tasks across every available tier leave RSS flat and nothing behind.

Marked slow (a few minutes): run with ``nox -s soak`` or ``pytest -m slow tests/test_soak.py``.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import Counter
from pathlib import Path

import psutil
import pytest

from wasmbox import Policy, Resources, Sandbox, Status, Task, TierName
from wasmbox.tiers.wasm import WasmTier
from wasmbox.workspace import PREFIX, workspace_root

pytestmark = pytest.mark.slow

TOTAL = int(os.environ.get("WASMBOX_SOAK_TASKS", "10000"))
PY_TASK = "def main(inp):\n    return {'n': sum(range(inp['n']))}\n"


def _fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


def _qemu_count() -> int:
    return sum(1 for p in psutil.process_iter(["name"]) if "qemu" in (p.info["name"] or ""))


def _mix(guests: dict[str, Path], tiers: set[TierName]) -> list[Task]:
    """Per 200 tasks: 150 modules (some hostile), 40 Python, 9 containers, 1 VM."""
    block: list[Task] = []
    for i in range(150):
        if i % 25 == 0:
            block.append(Task.wasm(guests["infinite_loop"], resources=Resources(timeout="10ms")))
        elif i % 25 == 1:
            block.append(Task.wasm(guests["output_size_flood"]))
        else:
            block.append(Task.wasm(guests["json_transform"], input={"xs": [i, i + 1]}))
    block += [Task.python(PY_TASK, input={"n": i}) for i in range(40)]
    if TierName.CONTAINER in tiers:
        block += [Task.command(["/bin/sh", "-c", "cat /task/input.json"], input={"i": i})
                  for i in range(9)]
    if TierName.VM in tiers:
        block.append(Task.command(["/bin/echo", "vm"], tier=TierName.VM))
    tasks: list[Task] = []
    while len(tasks) < TOTAL:
        tasks += block
    return tasks[:TOTAL]


def test_ten_thousand_mixed_tasks_leak_nothing(
    module_cache: Path, guests: dict[str, Path]
) -> None:
    from wasmbox.tiers.container import ContainerTier
    from wasmbox.tiers.vm import VmTier

    factories = {
        TierName.WASM: lambda: WasmTier(module_cache),
        TierName.CONTAINER: lambda: ContainerTier(pool_size=1),
        TierName.VM: lambda: VmTier(pool_size=1),
    }
    process = psutil.Process()
    gc.collect()
    threads0, fds0 = threading.active_count(), _fds()
    qemu0 = _qemu_count()
    with Sandbox(Policy(), tiers=factories) as sb:
        tiers = {t for t in factories if sb.availability(t).ok}
        tasks = _mix(guests, tiers)
        statuses: Counter[Status] = Counter()
        warm = len(tasks) // 10
        rss_warm = 0
        for start in range(0, len(tasks), 500):
            for r in sb.map(tasks[start:start + 500], concurrency=2):
                statuses[r.status] += 1
            if start + 500 >= warm and not rss_warm:
                gc.collect()
                rss_warm = process.memory_info().rss
        gc.collect()
        rss_end = process.memory_info().rss
    container_leftovers = []
    if TierName.CONTAINER in tiers:
        container_leftovers = ContainerTier().leftovers(os.getpid())
    gc.collect()
    assert sum(statuses.values()) == len(tasks)
    assert statuses[Status.COMPLETED] >= len(tasks) * 0.8, statuses
    assert set(statuses) <= {Status.COMPLETED, Status.TIMEOUT, Status.OUTPUT_REJECTED}, statuses
    assert rss_end - rss_warm < 64 << 20, f"RSS grew {(rss_end - rss_warm) >> 20} MiB"
    assert threading.active_count() == threads0
    # Made once per process, not per run: wasmtime's async runtime (an epoll and an eventfd)
    # and the container runtime's private mount namespace with its cgroup root.
    new = {fd: target for fd, target in _fds().items() if fd not in fds0}
    once = {"anon_inode:[eventpoll]", "anon_inode:[eventfd]", "/sys/fs/cgroup"}
    assert all(t in once or t.startswith("mnt:[") for t in new.values()), new
    assert len(new) <= 5, new
    assert not list(workspace_root().glob(PREFIX + f"{os.getpid()}-*"))
    assert container_leftovers == []
    assert _qemu_count() == qemu0
