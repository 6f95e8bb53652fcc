"""Threat: a task under gVisor escapes its resource limits, or hides how it broke them.

Under ``runtime="gvisor"`` the task's processes live in gVisor's kernel, not the host's: the
host pids cgroup holds gVisor's own threads (so it is set well above the task's limit) and
says nothing about the task's processes. A fork bomb must still stop at the task's process
limit, as it does under crun. And when the task exhausts its memory, the host's OOM killer
takes the whole sandbox and runsc removes the cgroup as it exits: the outcome must still be
MEMORY_EXCEEDED with the usage the cgroup showed during the run, not a bare FAILED/137.
"""

from __future__ import annotations

import psutil
import pytest

from tests.container import conftest as container_fixtures
from wasmbox import Sandbox, Status, Task
from wasmbox.models import MiB, Resources

pytestmark = pytest.mark.container

container_ready = container_fixtures.container_ready
native = container_fixtures.native
make_csb = container_fixtures.make_csb
gvisor = container_fixtures.gvisor

# Forks `n` children that wait; counts the forks the kernel refused.
FORK_N = (
    "import os, signal\n"
    "def main(inp):\n"
    "    children, refused = [], 0\n"
    "    for _ in range(inp['n']):\n"
    "        try:\n"
    "            pid = os.fork()\n"
    "        except OSError:\n"
    "            refused += 1\n"
    "            continue\n"
    "        if pid == 0:\n"
    "            signal.pause()\n"
    "            os._exit(0)\n"
    "        children.append(pid)\n"
    "    for pid in children:\n"
    "        os.kill(pid, signal.SIGKILL)\n"
    "        os.waitpid(pid, 0)\n"
    "    return {'forked': len(children), 'refused': refused}\n"
)




def test_gvisor_stops_forks_at_the_task_process_limit(gvisor: Sandbox) -> None:
    r = gvisor.run(Task.python(FORK_N, input={"n": 30}, tier="container", runtime="gvisor",
                               resources=Resources(pids=16, timeout=60)))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert isinstance(r.output, dict)
    assert r.output["forked"] < 16
    assert r.output["refused"] == 30 - r.output["forked"]


def test_gvisor_threads_start_within_the_limit(gvisor: Sandbox) -> None:
    source = (
        "import threading, time\n"
        "def main(inp):\n"
        "    ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(4)]\n"
        "    for t in ts: t.start()\n"
        "    for t in ts: t.join()\n"
        "    return len(ts)\n"
    )
    r = gvisor.run(Task.python(source, tier="container", runtime="gvisor",
                               resources=Resources(pids=16, timeout=60)))
    assert (r.status, r.output) == (Status.COMPLETED, 4), r.stderr


def test_gvisor_memory_bomb_is_memory_exceeded_with_metrics(gvisor: Sandbox) -> None:
    r = gvisor.run(Task.command(["/opt/guests/memory_hog"], runtime="gvisor",
                                resources=Resources(memory=64 * MiB, timeout=60)))
    assert r.status is Status.MEMORY_EXCEEDED, (r.exit_code, r.reason, r.stderr)
    assert r.metrics.peak_memory_bytes is not None
    assert r.metrics.peak_memory_bytes > 32 * MiB
    assert r.metrics.cpu_s is not None and r.metrics.cpu_s > 0


def test_gvisor_metrics_survive_a_normal_exit(gvisor: Sandbox) -> None:
    r = gvisor.run(Task.command(["/opt/guests/cpu_work", "20"], runtime="gvisor"))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.metrics.cpu_s is not None and r.metrics.cpu_s > 0
    assert r.metrics.peak_memory_bytes is not None and r.metrics.peak_memory_bytes > 0


def test_gvisor_leaves_no_zombie_stubs(gvisor: Sandbox) -> None:
    # The ptrace platform runs one stub process per guest address space, as the guest's
    # uid; they re-parent to us (the subreaper) when the sandbox ends.
    r = gvisor.run(Task.python(FORK_N, input={"n": 5}, tier="container", runtime="gvisor",
                               resources=Resources(pids=16, timeout=60)))
    assert r.status is Status.COMPLETED, r.stderr
    zombies = [p for p in psutil.Process().children(recursive=True)
               if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
