"""A guest the host is too busy to run is slow, not hung.

On a loaded host a TCG boot can take longer than the boot timeout in wall time while QEMU
waits for a CPU most of that time (load ~7 on two cores: 15-29 s for ~7 s of CPU). Such a
boot used to end as "the guest hung twice while booting". Boot waits now leave out the time
QEMU was runnable but queued for a CPU. The test starves a booting QEMU for real: all its
threads are pinned to one CPU under SCHED_IDLE next to a busy loop on that CPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from wasmbox import Policy, Task
from wasmbox.policy import apply
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.machine import Machine
from wasmbox.tiers.vm.tier import VmTier

CPU = min(os.sched_getaffinity(0))


def _set_autogroup_nice(pid: int, nice: int) -> None:
    # QEMU runs in a session of its own: with autogroup scheduling its group, not its
    # threads, competes with the busy loop, so the group is niced too.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _starve(pid: int, until: threading.Event) -> None:
    """Keep every thread of `pid` (new ones too) on `CPU` under SCHED_IDLE until `until`."""
    _set_autogroup_nice(pid, 19)
    while not until.wait(0.02):
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, {CPU})
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    _set_autogroup_nice(pid, 0)
    for tid in _threads(pid):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(tid, os.sched_getaffinity(0))


def test_a_starved_boot_is_waited_for_and_a_plain_wait_is_not(vm_assets: AssetReport,
                                                              tmp_path: Path) -> None:
    tier = VmTier(pool_size=0)
    try:
        shape = tier._shape(apply(Policy(), Task.command(["true"], tier="vm")),
                            vm_assets.assets)
    finally:
        tier.close()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(hog.pid, {CPU})
    released = threading.Event()
    release = threading.Timer(16.0, released.set)
    machine = Machine(tmp_path / "m", vm_assets.assets, shape, kvm=False, arm=True)
    starver = threading.Thread(target=_starve, args=(machine.process.pid, released))
    starver.start()
    try:
        assert not machine.wait_ready(1.0)  # without the grace: given up at the timeout
        release.start()
        t0 = time.monotonic()
        assert machine.wait_ready(15.0, starved_grace=True), machine.serial_tail()
        assert time.monotonic() - t0 > 15.0  # it really waited past the timeout
    finally:
        release.cancel()
        released.set()
        starver.join()
        hog.kill()
        hog.wait()
        machine.close()
