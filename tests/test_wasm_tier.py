"""The wasm tier through the public API: results, validation, caching, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

from wasmbox import (
    ConfigError,
    ModuleRejected,
    Policy,
    PolicyViolation,
    Resources,
    Sandbox,
    SandboxClosed,
    Status,
    Task,
)
from wasmbox.models import Limits, WasiPolicy

MakeSandbox = Callable[..., Sandbox]



def test_hello_completes_with_stdout_and_result(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["hello"]))
    assert r.status is Status.COMPLETED, r.reason
    assert r.exit_code == 0
    assert r.stdout == "hello from wasm\n"
    assert r.output == {"greeting": "hello"}
    assert r.metrics.fuel_consumed and r.metrics.fuel_consumed > 0
    assert r.metrics.peak_memory_bytes and r.metrics.peak_memory_bytes >= 65536


def test_json_transform_reads_input_and_writes_result(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    r = sandbox.run(Task.wasm(guests["json_transform"], input={"xs": [3, 1, 4, 1, 5]}))
    assert r.output == {"sum": 14, "count": 5, "max": 5}
    assert set(r.files) == {"result.json"}


def test_wordcount_counts(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["wordcount"], input={"text": "a bb\nccc d\n"}))
    assert r.output == {"words": 4, "lines": 2, "chars": 11}


def test_a_nonzero_exit_is_failed_with_its_code(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["exit_code"], input={"code": 7}))
    assert (r.status, r.exit_code) == (Status.FAILED, 7)


def test_an_out_of_range_exit_status_is_failed(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["exit_code"], input={"code": 200}))
    assert r.status is Status.FAILED
    assert "exit status" in (r.reason or "")


def test_args_and_env_reach_the_guest(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["echo_env"], args=("--flag", "two words"), env={"K": "v"}))
    assert r.stdout.splitlines() == ["K=v", "echo_env.wasm", "--flag", "two words"]


def test_module_bytes_run_like_a_path(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    r = sandbox.run(Task.wasm(guests["hello"].read_bytes()))
    assert r.status is Status.COMPLETED


def test_malformed_module_is_rejected(sandbox: Sandbox) -> None:
    with pytest.raises(ModuleRejected, match="not a valid WebAssembly module"):
        sandbox.run(Task.wasm(b"\0asm\1\0\0\0garbage"))


def test_a_module_without_start_is_rejected(sandbox: Sandbox) -> None:
    with pytest.raises(ModuleRejected, match="_start"):
        sandbox.run(Task.wasm(wasmtime.wat2wasm("(module (memory (export \"memory\") 1))")))


@pytest.mark.parametrize(("start", "status", "reason"), [
    ("(func (export \"_start\") (param i32))", Status.CRASHED, "too few parameters"),
    ("(func (export \"_start\") (result i32) i32.const 7)", Status.COMPLETED, None),
    ("(func (export \"_start\") unreachable)", Status.CRASHED, "unreachable"),
])
def test_start_of_any_signature_ends_as_a_status(sandbox: Sandbox, start: str, status: Status,
                                                 reason: str | None) -> None:
    # A plain `() -> ()` _start is called directly, any other through wasmtime-py's checks.
    wat = f'(module (memory (export "memory") 1) {start})'
    result = sandbox.run(Task.wasm(wasmtime.wat2wasm(wat)))
    assert result.status is status
    assert (result.reason is None) if reason is None else (reason in (result.reason or ""))


def test_an_import_outside_the_allowlist_is_a_policy_violation(sandbox: Sandbox) -> None:
    wat = """(module
      (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")))"""
    with pytest.raises(PolicyViolation) as info:
        sandbox.run(Task.wasm(wasmtime.wat2wasm(wat)))
    assert info.value.rule == "wasi.allowed_imports"
    assert "sock_accept" in info.value.message


def test_an_unknown_host_import_cannot_link(sandbox: Sandbox) -> None:
    wat = '(module (import "env" "f" (func)) (func (export "_start")))'
    with pytest.raises(PolicyViolation, match=r"env\.f"):
        sandbox.run(Task.wasm(wasmtime.wat2wasm(wat)))


def test_a_wrong_sha256_pin_is_rejected(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    with pytest.raises(ModuleRejected, match="pins"):
        sandbox.run(Task.wasm(guests["hello"], sha256="0" * 64))


def test_a_correct_pin_runs(make_sandbox: MakeSandbox, guests: dict[str, Path]) -> None:
    digest = hashlib.sha256(guests["hello"].read_bytes()).hexdigest()
    policy = Policy(wasi=WasiPolicy(require_sha256=True))
    with make_sandbox(policy) as sb:
        assert sb.run(Task.wasm(guests["hello"], sha256=digest)).ok


def test_initial_memory_above_the_cap_is_memory_exceeded(sandbox: Sandbox) -> None:
    wat = '(module (memory (export "memory") 512) (func (export "_start")))'  # 32 MiB
    task = Task.wasm(wasmtime.wat2wasm(wat), resources=Resources(memory="16M"))
    r = sandbox.run(task)
    assert r.status is Status.MEMORY_EXCEEDED


def test_a_stack_limit_wasmtime_cannot_honour_is_a_config_error(
    make_sandbox: MakeSandbox, guests: dict[str, Path]
) -> None:
    with make_sandbox(Policy(limits=Limits(stack="64M"))) as sb, \
            pytest.raises(ConfigError, match=r"limits\.stack"):
        sb.run(Task.wasm(guests["hello"]))


def test_compiled_modules_are_cached_on_disk_per_flavour(
    make_sandbox: MakeSandbox, tmp_path: Path, guests: dict[str, Path]
) -> None:
    with make_sandbox(cache=tmp_path) as sb:
        assert sb.run(Task.wasm(guests["hello"])).ok
    cached = list(tmp_path.glob("*.cwasm"))
    assert len(cached) == 1
    digest = hashlib.sha256(guests["hello"].read_bytes()).hexdigest()
    assert cached[0].name.startswith(digest)
    assert "wasmtime" in cached[0].name
    assert "fuel1" in cached[0].name


def test_a_corrupt_cache_entry_is_recompiled(
    make_sandbox: MakeSandbox, tmp_path: Path, guests: dict[str, Path]
) -> None:
    with make_sandbox(cache=tmp_path) as sb:
        sb.run(Task.wasm(guests["hello"]))
    entry = next(tmp_path.glob("*.cwasm"))
    entry.write_bytes(b"garbage")
    with make_sandbox(cache=tmp_path) as sb:
        assert sb.run(Task.wasm(guests["hello"])).ok
    assert entry.read_bytes() != b"garbage"


def test_map_runs_on_threads_and_keeps_order(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    tasks = [Task.wasm(guests["json_transform"], input={"xs": [i, i]}) for i in range(40)]
    results = sandbox.map(tasks, concurrency=2)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert [r.output["sum"] for r in results] == [2 * i for i in range(40)]  # type: ignore[index]


def test_arun_works_from_asyncio(sandbox: Sandbox, guests: dict[str, Path]) -> None:
    async def main() -> list[Status]:
        runs = (sandbox.arun(Task.wasm(guests["hello"])) for _ in range(4))
        results = await asyncio.gather(*runs)
        return [r.status for r in results]

    assert asyncio.run(main()) == [Status.COMPLETED] * 4


def test_a_closed_sandbox_refuses_work(make_sandbox: MakeSandbox, guests: dict[str, Path]) -> None:
    sb = make_sandbox()
    sb.close()
    with pytest.raises(SandboxClosed):
        sb.run(Task.wasm(guests["hello"]))


def test_module_bytes_are_hashed_once_per_object_and_pins_still_checked(
    sandbox: Sandbox, guests: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = guests["hello"].read_bytes()
    hashed: list[bytes] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> hashlib._Hash:
        hashed.append(data)
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    for _ in range(3):  # one object, as a Dask chunk's tasks share: hashed once
        assert sandbox.run(Task.wasm(data)).ok
    assert [h for h in hashed if h == data] == [data]
    same = bytes(bytearray(data))  # equal contents, another object: hashed again
    assert sandbox.run(Task.wasm(same)).ok
    assert len([h for h in hashed if h == data]) == 2
    with pytest.raises(ModuleRejected, match="pins"):  # a remembered digest is still checked
        sandbox.run(Task.wasm(same, sha256="0" * 64))
    other = Task.wasm(guests["echo_env"].read_bytes(), sha256=real(data).hexdigest())
    with pytest.raises(ModuleRejected, match="pins"):  # another module never takes its digest
        sandbox.run(other)
