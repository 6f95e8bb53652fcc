"""Hostile guests: every one is stopped with its exact status, and the host stays untouched.

Each test names the guard it proves; removing that guard makes the test fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmbox import Policy, Resources, Sandbox, Status, Task
from wasmbox.models import Limits, OutputPolicy
from wasmbox.workspace import PREFIX, workspace_root

MakeSandbox = Callable[..., Sandbox]


@pytest.fixture(autouse=True)
def no_workspace_left_behind() -> object:
    before = {p.name for p in workspace_root().glob(PREFIX + "*")}
    yield None
    after = {p.name for p in workspace_root().glob(PREFIX + "*")}
    assert after <= before, f"workspaces leaked: {after - before}"


def test_infinite_loop_is_stopped_by_the_epoch_deadline(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    r = sandbox.run(Task.wasm(guests["infinite_loop"], resources=Resources(timeout="200ms")))
    assert r.status is Status.TIMEOUT
    assert r.reason == "wall-clock deadline passed"
    assert r.exit_code is None


def test_fuel_burner_is_stopped_by_fuel(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    task = Task.wasm(guests["fuel_burner"], resources=Resources(fuel=50_000_000, timeout=30))
    r = sandbox.run(task)
    assert (r.status, r.trap) == (Status.OUT_OF_FUEL, "out_of_fuel")


def test_infinite_loop_is_also_stopped_by_fuel(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    task = Task.wasm(guests["infinite_loop"], resources=Resources(fuel=10_000_000, timeout=30))
    assert sandbox.run(task).status is Status.OUT_OF_FUEL


def test_memory_bomb_hits_the_store_limit(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["memory_bomb"], resources=Resources(memory="32M")))
    assert r.status is Status.MEMORY_EXCEEDED
    assert r.metrics.peak_memory_bytes is not None
    assert r.metrics.peak_memory_bytes <= 32 << 20


def test_stack_overflow_traps_instead_of_corrupting_memory(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    r = sandbox.run(Task.wasm(guests["stack_overflow"]))
    assert r.status is Status.CRASHED
    assert r.trap in {"memory_out_of_bounds", "stack_overflow"}


def test_unreachable_is_a_crash_with_its_trap_code(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    r = sandbox.run(Task.wasm(guests["trap_unreachable"]))
    assert (r.status, r.trap) == (Status.CRASHED, "unreachable")


def test_bad_exit_is_failed_with_its_code(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["bad_exit"]))
    assert (r.status, r.exit_code) == (Status.FAILED, 42)


def test_stdout_flood_is_stopped_and_truncated(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    policy = Policy(limits=Limits(stdout_bytes="64K"))
    with make_sandbox(policy) as sb:
        r = sb.run(Task.wasm(guests["stdout_flood"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert (r.reason or "").startswith("stdout flood")
    assert r.stdout_truncated and r.truncated
    assert len(r.stdout.encode()) <= 64 * 1024


def test_output_file_size_flood_is_stopped(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["output_size_flood"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert "big.bin exceeds" in (r.reason or "") or "in total" in (r.reason or "")
    assert r.files == {}


def test_output_file_count_flood_is_stopped(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox(Policy(output=OutputPolicy(max_files=16))) as sb:
        r = sb.run(Task.wasm(guests["output_count_flood"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason == "more than 16 output files"


def test_writes_into_the_input_dir_are_denied(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["write_input"], input={"keep": "me"}))
    assert r.status is Status.COMPLETED, r.stdout + r.stderr
    assert "ALLOWED" not in r.stdout
    assert r.stdout.count("DENIED") == 2


def test_path_escapes_are_denied(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["path_escape"]))
    assert r.status is Status.COMPLETED, r.stdout
    assert "ALLOWED" not in r.stdout
    assert r.stdout.count("DENIED") == 6


def test_a_planted_symlink_is_never_collected(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["symlink_plant"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert (r.reason or "").endswith("is a symlink")
    assert r.files == {}


def test_host_environment_never_leaks(
    sandbox: Sandbox, guests: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASMBOX_SECRET", "hunter2")
    assert os.environ["HOME"]
    r = sandbox.run(Task.wasm(guests["read_env"]))
    assert (r.status, r.exit_code) == (Status.COMPLETED, 0)
    assert "hunter2" not in r.stdout


def test_a_deny_pattern_on_stdout_rejects_the_run(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox(Policy(output=OutputPolicy(deny_patterns=("from wasm",)))) as sb:
        r = sb.run(Task.wasm(guests["hello"]))
    assert r.status is Status.OUTPUT_REJECTED
    assert "matched in stdout" in (r.reason or "")


def test_hostile_guests_run_side_by_side_without_interfering(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    tasks = [
        Task.wasm(guests["infinite_loop"], resources=Resources(timeout="300ms")),
        Task.wasm(guests["hello"]),
        Task.wasm(guests["memory_bomb"], resources=Resources(memory="16M")),
        Task.wasm(guests["json_transform"], input={"xs": [1, 2]}),
    ]
    statuses = [r.status for r in sandbox.map(tasks, concurrency=2)]
    assert statuses == [Status.TIMEOUT, Status.COMPLETED, Status.MEMORY_EXCEEDED, Status.COMPLETED]
