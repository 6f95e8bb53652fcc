"""Guests restored from a template snapshot: they run tasks like booted ones, never share
random state, fall back to booting when a snapshot is broken, and leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Result, Sandbox, Task
from wasmbox.models import Resources, Status, TierName
from wasmbox.policy import apply
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.janitor import PREFIX, reclaim
from wasmbox.tiers.vm.machine import arming_line
from wasmbox.tiers.vm.tier import VmTier
from wasmbox.workspace import workspace_root

pytestmark = pytest.mark.vm

ProcessesNaming = Callable[[set[Path]], list[int]]
WARM_TIMEOUT = 60.0  # a template boots in ~1.5 s quiet; only a broken pool takes this long
TRUE = Task.command(["true"], tier="vm")


def command(*argv: str, **fields: object) -> Task:
    return Task.command(list(argv), tier="vm", **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def restoring(vm_assets: AssetReport) -> Iterator[tuple[Sandbox, VmTier]]:
    """A sandbox whose VM pool restores every guest from one template snapshot."""
    tier = VmTier(pool_size=1)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: tier}) as sandbox:
        _make_template(sandbox, tier)
        yield sandbox, tier


def _make_template(sandbox: Sandbox, tier: VmTier) -> None:
    """Use up the shape's first (booted) guest: the pool makes the template next."""
    tier.prepare(apply(sandbox.policy, TRUE))
    assert tier.wait_warm(WARM_TIMEOUT)
    assert sandbox.run(TRUE).status is Status.COMPLETED
    assert tier.wait_warm(WARM_TIMEOUT), tier.snapshot_failures
    assert tier.snapshots, tier.snapshot_failures


def _run_restored(sandbox: Sandbox, tier: VmTier, task: Task) -> Result:
    assert tier.wait_warm(WARM_TIMEOUT)
    result = sandbox.run(task)
    assert result.metrics.extra.get("restored") == 1.0, result
    return result


def test_restored_guest_reads_input_and_writes_output(
    restoring: tuple[Sandbox, VmTier],
) -> None:
    sandbox, tier = restoring
    payload = {"xs": [1, 2, 3]}
    script = ("cat /task/input.json; echo '{\"ok\": true}' > /task/output/result.json; "
              "date +%s >&2")
    result = _run_restored(sandbox, tier, command("sh", "-c", script, input=payload))
    assert result.status is Status.COMPLETED and result.exit_code == 0
    assert json.loads(result.stdout) == payload
    assert result.output == {"ok": True}
    # The host set the clock when it armed the guest: not the template's boot time.
    assert abs(int(result.stderr) - time.time()) < 120


def test_restored_guest_reports_exit_codes(restoring: tuple[Sandbox, VmTier]) -> None:
    sandbox, tier = restoring
    result = _run_restored(sandbox, tier, command("sh", "-c", "echo oops >&2; exit 3"))
    assert result.status is Status.FAILED
    assert result.exit_code == 3
    assert result.stderr == "oops\n"


def test_restored_guest_enforces_the_memory_limit(restoring: tuple[Sandbox, VmTier]) -> None:
    sandbox, tier = restoring
    task = command("tail", "/dev/zero", resources=Resources(memory="48MiB"))
    result = _run_restored(sandbox, tier, task)
    assert result.status is Status.MEMORY_EXCEEDED
    assert result.metrics.peak_memory_bytes is not None
    assert result.metrics.peak_memory_bytes <= 48 * 1024 * 1024


def test_restored_guest_reports_qemu_cpu_split_at_the_ready_marker(
    restoring: tuple[Sandbox, VmTier],
) -> None:
    sandbox, tier = restoring
    idle = _run_restored(sandbox, tier, TRUE).metrics.extra
    busy = _run_restored(sandbox, tier, command(
        "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")).metrics.extra
    for extra in (idle, busy):
        # A restore costs QEMU CPU of its own (starting, loading, arming the guest).
        assert extra["qemu_ready_cpu_s"] > 0.0
        assert extra["qemu_task_cpu_s"] >= 0.0
    # The task's share follows what the task does; the restore's does not include it.
    assert busy["qemu_task_cpu_s"] > idle["qemu_task_cpu_s"] + 0.1
    assert busy["qemu_ready_cpu_s"] < busy["qemu_task_cpu_s"]


def test_two_restored_guests_never_share_random_output(
    restoring: tuple[Sandbox, VmTier],
) -> None:
    sandbox, tier = restoring
    # entropy_avail is 256 once the host's entropy was credited: without it the template's
    # RNG, copied into every restore, would be all a guest has.
    script = ("cat /proc/sys/kernel/random/entropy_avail; head -c 32 /dev/urandom | od -An -tx1; "
              "cat /proc/sys/kernel/random/boot_id")
    task = command("sh", "-c", script)
    first = _run_restored(sandbox, tier, task)
    second = _run_restored(sandbox, tier, task)
    assert first.status is second.status is Status.COMPLETED
    a, b = first.stdout.split("\n", 1), second.stdout.split("\n", 1)
    assert a[0] == b[0] == "256"
    assert a[1] != b[1]


def test_every_guest_is_armed_with_its_own_entropy() -> None:
    # The guest's own interrupt timings differ too, so the comparison above cannot see
    # repeated host entropy: this checks what the host sends.
    lines = [arming_line().split() for _ in range(2)]
    assert all(len(bytes.fromhex(seed.decode())) == 64 for seed, _ in lines)
    assert lines[0][0] != lines[1][0]
    assert abs(int(lines[0][1]) - time.time()) < 5


def _our_run_dirs(before: set[Path]) -> set[Path]:
    root = Path(workspace_root())
    return {d for d in root.glob(f"{PREFIX}{os.getpid()}-*") if d not in before}


@contextlib.contextmanager
def _own_tier() -> Iterator[tuple[Sandbox, VmTier, Path]]:
    """A restoring tier of its own, its template made, and its run dir (gone after close)."""
    before = set(Path(workspace_root()).glob(f"{PREFIX}{os.getpid()}-*"))
    tier = VmTier(pool_size=1)
    with Sandbox(Policy(), tiers={TierName.VM: lambda: tier}) as sandbox:
        _make_template(sandbox, tier)
        [run_dir] = _our_run_dirs(before)
        yield sandbox, tier, run_dir


def test_corrupt_snapshot_falls_back_to_booting_and_leaks_nothing(
    vm_assets: AssetReport, processes_naming: ProcessesNaming,
) -> None:
    with _own_tier() as (sandbox, tier, run_dir):
        [(shape, snapshot)] = tier.snapshots.items()
        snapshot.state.write_bytes(b"not a QEMU migration stream" * 100)

        first = sandbox.run(TRUE)  # takes the guest restored before the damage
        assert tier.wait_warm(WARM_TIMEOUT), "the pool did not fall back to booting"
        second = sandbox.run(TRUE)

        assert first.status is second.status is Status.COMPLETED
        assert second.metrics.extra.get("restored") == 0.0
        assert "restore failed" in tier.snapshot_failures[shape]
        assert not snapshot.directory.exists()
        # Only the pool's one booted guest is left in the run dir, and it is alive.
        assert tier.wait_warm(WARM_TIMEOUT)
        machines = sorted(p.name for p in run_dir.iterdir())
        assert len(machines) == 1, machines
        assert len(processes_naming({run_dir})) == 1
    assert not run_dir.exists()
    assert processes_naming({run_dir}) == []


_OWNER = """
import sys, time
from wasmbox import Policy, Sandbox, Task
from wasmbox.models import TierName
from wasmbox.policy import apply
from wasmbox.tiers.vm.tier import VmTier
tier = VmTier(pool_size=1)
sandbox = Sandbox(Policy(), tiers={TierName.VM: lambda: tier})
task = Task.command(["true"], tier="vm")
tier.prepare(apply(Policy(), task))
tier.wait_warm(60.0)
sandbox.run(task)  # the first guest boots; the pool makes the template for the next
ok = tier.wait_warm(60.0)
print(ok, *[s.directory for s in tier.snapshots.values()], flush=True)
print(tier.snapshot_failures, flush=True)  # read by the test when there is no snapshot
time.sleep(600)
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path (QEMU's sockets live below it)."""
    with tempfile.TemporaryDirectory(prefix="wbx-", dir="/tmp") as tmp:
        yield Path(tmp)


def test_janitor_reclaims_the_snapshot_of_a_dead_owner(
    vm_assets: AssetReport, processes_naming: ProcessesNaming, short_tmp: Path,
) -> None:
    # The owner keeps its run dir in short_tmp, so no other process's janitor races ours.
    tmp_path = short_tmp
    env = {**os.environ, "WASMBOX_TMPDIR": str(tmp_path)}
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert owner.stdout is not None
        words = owner.stdout.readline().split()
        if len(words) != 2:
            words.append(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert words[0] == "True" and len(words) == 2, words
    snapshot = Path(words[1])
    run_dir = snapshot.parent
    assert (snapshot / "ram").exists() and (snapshot / "state").exists()
    assert run_dir.name.startswith(f"{PREFIX}{owner.pid}-")
    assert run_dir.parent == tmp_path
    assert reclaim(tmp_path) == [run_dir]
    assert not snapshot.exists() and not run_dir.exists()
    for _ in range(200):  # SIGKILLed QEMUs take a moment to exit
        if not processes_naming({run_dir}):
            break
        time.sleep(0.05)
    assert processes_naming({run_dir}) == []
