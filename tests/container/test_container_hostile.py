"""Hostile native programs against the container tier: each guard holds, with the exact status."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from wasmbox import Sandbox, Status, Task
from wasmbox.models import AnomalyRule, MiB, MonitorPolicy, Resources

pytestmark = pytest.mark.container

G = "/opt/guests/"


def test_fork_bomb_is_held_by_the_pids_limit(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "fork_bomb"], resources=Resources(pids=16)))
    assert r.status is Status.COMPLETED, (r.exit_code, r.stdout, r.stderr)
    counts = dict(kv.split("=") for kv in r.stdout.split())
    assert int(counts["forked"]) < 16
    assert int(counts["refused"]) > 0
    assert r.metrics.extra["pids_limit_hits"] > 0


def test_memory_hog_is_memory_exceeded(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "memory_hog"], resources=Resources(memory=32 * MiB)))
    assert r.status is Status.MEMORY_EXCEEDED
    assert r.metrics.extra["oom_kills"] >= 1


def test_cpu_spinner_times_out(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "cpu_spin"], resources=Resources(timeout=0.5)))
    assert r.status is Status.TIMEOUT


def test_cpu_quota_throttles_a_spinner(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "cpu_spin"], resources=Resources(timeout=0.5, cpus=0.2)))
    assert r.status is Status.TIMEOUT
    assert r.metrics.extra["cpu_throttled_periods"] > 0


def test_network_connect_is_unreachable(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "net_connect"]))
    assert r.status is Status.FAILED
    assert r.exit_code == errno.ENETUNREACH, r.stdout


def test_only_loopback_exists(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"]))
    assert r.status is Status.COMPLETED
    assert r.stdout.split() == ["lo"]


DENIED = (errno.EROFS, errno.EACCES)


@pytest.mark.parametrize("path", ["/evil", "/usr/bin/evil", "/etc/passwd"])
def test_write_to_root_is_denied(csb: Sandbox, path: str) -> None:
    r = csb.run(Task.command([G + "fsprobe", "c", path]))
    assert r.status is Status.FAILED
    assert r.exit_code in DENIED, r.stdout


def test_write_to_input_is_denied(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "fsprobe", "w", "/task/input.json"], input={"a": 1}))
    assert r.status is Status.FAILED
    assert r.exit_code in DENIED, r.stdout


def test_write_beside_input_is_denied(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "fsprobe", "c", "/task/planted"]))
    assert r.exit_code in DENIED, r.stdout


@pytest.mark.parametrize("mountpoint", ["/", "/task", "/usr", "/opt/guests"])
def test_root_task_and_host_dirs_are_mounted_read_only(csb: Sandbox, mountpoint: str) -> None:
    # Permissions alone deny most writes to uid 65534; the mount flag is the guard that
    # holds even for files the guest could own.
    r = csb.run(Task.command(["/bin/sh", "-c", "cat /proc/self/mounts"]))
    options = {m.split()[1]: m.split()[3].split(",") for m in r.stdout.splitlines()}
    assert "ro" in options[mountpoint]


def test_output_dir_is_the_only_writable_task_place(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c", "cat /proc/self/mounts"]))
    options = {m.split()[1]: m.split()[3].split(",") for m in r.stdout.splitlines()}
    assert "rw" in options["/task/output"]
    assert "noexec" in options["/task/output"]


@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/root", "/home", "/var/log", "/run", "/work", "/sys/kernel"]
)
def test_host_files_outside_the_mounts_are_not_there(csb: Sandbox, path: str) -> None:
    r = csb.run(Task.command([G + "fsprobe", "r", path]))
    assert r.status is Status.FAILED
    assert r.exit_code == errno.ENOENT, r.stdout


@pytest.mark.parametrize("operation", ["mount", "unshare", "ptrace", "chroot", "clone_newuser"])
def test_privileged_syscalls_are_denied(csb: Sandbox, operation: str) -> None:
    r = csb.run(Task.command([G + "sysprobe", operation]))
    assert r.status is Status.FAILED
    assert r.exit_code == errno.EPERM, r.stdout


def test_setuid_root_fails(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "sysprobe", "setuid"]))
    assert r.status is Status.FAILED
    assert r.exit_code == errno.EPERM, r.stdout


def test_guest_runs_as_nobody_without_capabilities(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c",
                              "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' "
                              "/proc/self/status"]))
    lines = r.stdout.split("\n")
    assert lines[0] == "65534"
    fields = dict(line.split(":\t") for line in lines[1:] if line)
    assert fields == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000",
                      "NoNewPrivs": "1", "Seccomp": "2"}


def test_stdout_flood_is_output_rejected(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "flood", "stdout"], resources=Resources(stdout_bytes=4096)))
    assert r.status is Status.OUTPUT_REJECTED
    assert "flood" in (r.reason or "")


def test_output_file_flood_is_output_rejected(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "flood", "file"], resources=Resources(output_bytes=MiB)))
    assert r.status is Status.OUTPUT_REJECTED


def test_segfault_is_crashed_with_the_signal(csb: Sandbox) -> None:
    r = csb.run(Task.command([G + "segfault"]))
    assert r.status is Status.CRASHED
    assert r.trap == "signal SIGSEGV"


def test_tmp_is_size_capped(make_csb: Callable[..., Sandbox]) -> None:
    sb = make_csb(tmpfs="1MiB")
    r = sb.run(Task.command(["/bin/sh", "-c", "head -c 2000000 /dev/zero > /tmp/big"]))
    assert r.status is Status.FAILED
    assert "No space left" in r.stderr


def test_sustained_throttling_is_an_anomaly_when_the_policy_kills_on_it(
    make_csb: Callable[..., Sandbox],
) -> None:
    sb = make_csb(monitor=MonitorPolicy(
        interval=0.05, throttled_samples=3, kill_on=frozenset({AnomalyRule.CPU_THROTTLED})))
    r = sb.run(Task.command([G + "cpu_spin"], resources=Resources(cpus=0.1, timeout=5)))
    assert r.status is Status.ANOMALY
    assert [e.rule for e in r.events] == [AnomalyRule.CPU_THROTTLED]


def test_memory_near_its_cap_is_reported_from_the_cgroup(csb: Sandbox) -> None:
    fill = "head -c 30000000 /dev/zero > /tmp/fill; sleep 0.3"
    r = csb.run(Task.command(["/bin/sh", "-c", fill], resources=Resources(memory=32 * MiB)))
    assert AnomalyRule.MEMORY_NEAR_CAP in [e.rule for e in r.events]
