"""What the container tier must get right for well-behaved tasks, cold, pooled and under gVisor."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from wasmbox import Sandbox, Status, Task
from wasmbox.models import Resources
from wasmbox.tiers.container import ContainerPool, ContainerTier

pytestmark = pytest.mark.container

ECHO = "cat /task/input.json > /task/output/result.json"


def test_input_is_echoed_to_result(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c", ECHO], input={"xs": [1, 2, 3]}))
    assert r.status is Status.COMPLETED
    assert r.output == {"xs": [1, 2, 3]}


def test_python_task_runs_in_the_container(csb: Sandbox) -> None:
    source = "def main(inp):\n    return {'sum': sum(inp['xs'])}\n"
    r = csb.run(Task.python(source, input={"xs": [1, 2, 39]}, tier="container"))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == {"sum": 42}


def test_python_exception_is_failed_with_traceback(csb: Sandbox) -> None:
    r = csb.run(Task.python("def main(inp):\n    raise ValueError('no')\n", tier="container"))
    assert r.status is Status.FAILED
    assert r.exit_code == 1
    assert "ValueError: no" in r.stderr


def test_native_static_program_writes_its_result(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/opt/guests/hello"]))
    assert r.status is Status.COMPLETED
    assert r.stdout == "hello from a container\n"
    assert r.output == {"hello": "world"}


def test_non_zero_exit_is_failed_with_its_code(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c", "echo oops >&2; exit 3"]))
    assert r.status is Status.FAILED
    assert (r.exit_code, r.stderr) == (3, "oops\n")


def test_missing_program_is_failed_127(csb: Sandbox) -> None:
    r = csb.run(Task.command(["no-such-program"]))
    assert r.status is Status.FAILED
    assert r.exit_code == 127


def test_stdout_is_cut_at_its_cap(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/bin/sh", "-c", "head -c 3000 /dev/zero | tr '\\0' a"],
                             resources=Resources(stdout_bytes=1000)))
    assert r.status is Status.COMPLETED
    assert r.stdout == "a" * 1000
    assert r.stdout_truncated


def test_env_is_the_plans_only(csb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMBOX_HOST_SECRET", "leak")
    r = csb.run(Task.command(["/usr/bin/env"], env={"GREETING": "hi"}))
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env["GREETING"] == "hi"
    assert "WASMBOX_HOST_SECRET" not in env
    assert set(env) <= {"GREETING", "PATH", "HOME", "LANG"}


def test_metrics_come_from_the_cgroup(csb: Sandbox) -> None:
    r = csb.run(Task.command(["/opt/guests/cpu_work", "20"]))
    assert r.status is Status.COMPLETED
    assert r.metrics.cpu_s is not None and r.metrics.cpu_s > 0
    assert r.metrics.peak_memory_bytes is not None and r.metrics.peak_memory_bytes > 0
    assert r.metrics.extra["pids_peak"] >= 1


def test_pooled_container_runs_the_task(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(pool_size=1)
    sb = make_csb(tier)
    _prewarm(sb, tier, Task.command(["/bin/true"]))
    r = sb.run(Task.command(["/bin/sh", "-c", ECHO + "; echo done"], input={"a": 1}))
    assert r.metrics.extra.get("pooled") == 1.0
    assert r.status is Status.COMPLETED
    assert (r.output, r.stdout) == ({"a": 1}, "done\n")


def test_pooled_python_task(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(pool_size=1)
    sb = make_csb(tier)
    task = Task.python("def main(inp):\n    return inp['n'] * 2\n", input={"n": 21},
                       tier="container")
    _prewarm(sb, tier, task)
    r = sb.run(task)
    assert r.metrics.extra.get("pooled") == 1.0
    assert (r.status, r.output) == (Status.COMPLETED, 42)


def test_pooled_container_is_never_reused(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(pool_size=2)
    sb = make_csb(tier)
    pool = _prewarm(sb, tier, Task.command(["/bin/true"]))
    first = sb.run(Task.command(["/bin/sh", "-c", "echo secret > /task/output/s; "
                                 "echo secret > /tmp/s; echo $$ > /tmp/pid"]))
    assert first.files == {"s": b"secret\n"}
    pool.wait_ready()
    second = sb.run(Task.command(["/bin/sh", "-c", "ls /task/output /tmp"]))
    assert first.metrics.extra.get("pooled") == second.metrics.extra.get("pooled") == 1.0
    assert second.status is Status.COMPLETED
    assert "s" not in second.stdout.split()
    assert second.files == {}


def test_pooled_timeout_is_timeout(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(pool_size=1)
    sb = make_csb(tier)
    _prewarm(sb, tier, Task.command(["/bin/true"], resources=Resources(timeout=0.5)))
    r = sb.run(Task.command(["/opt/guests/cpu_spin"], resources=Resources(timeout=0.5)))
    assert r.metrics.extra.get("pooled") == 1.0
    assert r.status is Status.TIMEOUT


def test_gvisor_runs_the_same_bundle(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier()
    available = tier.runtime_availability("gvisor")
    if not available.ok:
        tier.close()
        pytest.skip(available.reason)
    sb = make_csb(tier)
    r = sb.run(Task.command(["/bin/sh", "-c", ECHO + "; id -u"], input={"g": 1},
                            runtime="gvisor"))
    assert r.status is Status.COMPLETED, r.stderr
    assert (r.output, r.stdout) == ({"g": 1}, "65534\n")


def test_gvisor_timeout_is_timeout(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier()
    available = tier.runtime_availability("gvisor")
    if not available.ok:
        tier.close()
        pytest.skip(available.reason)
    sb = make_csb(tier)
    r = sb.run(Task.command(["/opt/guests/cpu_spin"], runtime="gvisor",
                            resources=Resources(timeout=1.0)))
    assert r.status is Status.TIMEOUT


def test_unknown_runtime_is_unavailable(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier()
    assert not tier.runtime_availability("nosuch").ok
    tier.close()


def _prewarm(sb: Sandbox, tier: ContainerTier, task: Task) -> ContainerPool:
    from wasmbox.policy import apply

    pool = tier.prewarm(apply(sb.policy, task))
    assert pool is not None
    assert pool.wait_ready(), "the pool did not fill"
    return pool


def test_workspace_holds_the_bundle_only_while_running(csb: Sandbox) -> None:
    root = os.environ["WASMBOX_TMPDIR"]
    before = set(os.listdir(root))
    csb.run(Task.command(["/bin/true"]))
    assert {n for n in os.listdir(root) if n.startswith("wasmbox-")} <= before


def test_runc_runs_the_same_bundle(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(runtime="runc")
    available = tier.availability()
    if not available.ok and "not installed" in available.reason:
        tier.close()
        pytest.skip(available.reason)
    assert available.ok, available.reason
    sb = make_csb(tier)
    r = sb.run(Task.command(["/bin/sh", "-c", ECHO + "; id -u"], input={"r": 1}))
    assert r.status is Status.COMPLETED, r.stderr
    assert (r.output, r.stdout) == ({"r": 1}, "65534\n")


def test_runc_tmp_is_writable_by_the_task(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(runtime="runc")
    available = tier.availability()
    if not available.ok and "not installed" in available.reason:
        tier.close()
        pytest.skip(available.reason)
    sb = make_csb(tier)
    r = sb.run(Task.command(["/bin/sh", "-c", "echo x > /tmp/f && cat /tmp/f"]))
    assert (r.status, r.stdout) == (Status.COMPLETED, "x\n"), r.stderr


def test_concurrent_runs_see_only_their_own_input(csb: Sandbox) -> None:
    tasks = [Task.command(["/bin/sh", "-c", ECHO], input={"i": i}) for i in range(8)]
    results = csb.map(tasks, concurrency=4)
    assert [r.output for r in results] == [{"i": i} for i in range(8)]
