"""Class 6: compiling a hostile module must be bounded, and its cost reported.

Threat: compilation is work the module's author chooses. A ~3 MB module with one huge
function cost 8 s of host CPU and 750 MiB of RSS to compile, in the host process, with
``timeout=1s``, charged to nobody. A module the cache has not seen is now compiled in a
worker process under RLIMIT_AS and RLIMIT_CPU, killed at the task's timeout (plus the
worker's start-up), and refused with `ModuleRejected` when it does not fit; a module that
does compile reports what that cost in ``metrics.extra["compile_s"]`` (once: cache hits
cost nothing and never leave the process).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

from wasmbox import Resources, Sandbox, Status, Task
from wasmbox.errors import ModuleRejected
from wasmbox.tiers.wasm.cache import compile_budget, compile_in_worker
from wasmbox.tiers.wasm.engine import Flavour

pytestmark = pytest.mark.timeout(300, method="thread")
MakeSandbox = Callable[..., Sandbox]


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _section(ident: int, payload: bytes) -> bytes:
    return bytes([ident]) + _leb(len(payload)) + payload


def _vec(items: list[bytes]) -> bytes:
    return _leb(len(items)) + b"".join(items)


def _name(text: str) -> bytes:
    return _leb(len(text)) + text.encode()


def huge_function_module(units: int) -> bytes:
    """A WASI-command-shaped module whose ``_start`` is `units` x (x = x + 1), one function."""
    unit = b"\x20\x00\x41\x01\x6a\x21\x00"  # local.get 0; i32.const 1; i32.add; local.set 0
    body = _vec([_leb(1) + b"\x7f"]) + unit * units + b"\x0b"
    return (
        b"\0asm\x01\0\0\0"
        + _section(1, _vec([b"\x60\x00\x00"]))  # type 0: [] -> []
        + _section(3, _vec([_leb(0)]))  # one function of type 0
        + _section(5, _vec([b"\x00\x01"]))  # one memory, min 1 page
        + _section(7, _vec([_name("_start") + b"\x00" + _leb(0),
                            _name("memory") + b"\x02" + _leb(0)]))
        + _section(10, _vec([_leb(len(body)) + body]))
    )


def test_huge_function_is_refused_at_the_task_timeout(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    # 4.2 MB: ~12 s and ~600 MiB to compile unbounded here (400 000 compiled within the 2 s
    # budget on a fast, quiet host)
    data = huge_function_module(600_000)
    assert len(data) > 4_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with make_sandbox(cache=tmp_path) as sandbox, pytest.raises(
        ModuleRejected, match="compiling the module took longer than its 2 s budget"
    ):
        sandbox.run(Task.wasm(data, resources=Resources(timeout=1)))
    # A behaviour bound, with a wide margin: the worker is killed at 2 s.
    assert time.monotonic() - t0 < 6
    # The compile's memory was the worker's, not this process's (unbounded: +300 MiB).
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 150 * 1024
    assert not list(tmp_path.glob("*.cwasm"))  # nothing half-compiled was cached


def test_the_worker_is_bounded_in_address_space() -> None:
    data = huge_function_module(100_000)
    with pytest.raises(ModuleRejected, match="address space"):
        compile_in_worker(Flavour(fuel=True, stack=1 << 20), data, compile_budget(60),
                          address_space=64 << 20)


def test_an_invalid_module_is_rejected_with_the_validator_reason(sandbox: Sandbox) -> None:
    with pytest.raises(ModuleRejected, match="not a valid WebAssembly module"):
        sandbox.run(Task.wasm(b"\0asm\x01\0\0\0\x01\x05"))  # a truncated type section


def test_compile_cost_is_reported_once(make_sandbox: MakeSandbox, tmp_path: Path) -> None:
    wat = '(module (memory (export "memory") 1) (func (export "_start")))'
    task = Task.wasm(bytes(wasmtime.wat2wasm(wat)))
    with make_sandbox(cache=tmp_path) as sandbox:
        first = sandbox.run(task)
        second = sandbox.run(task)
    assert first.status is Status.COMPLETED
    assert first.metrics.extra["compile_s"] > 0
    assert second.metrics.extra["compile_s"] == 0.0  # a cache hit compiles nothing


def test_compile_budget_follows_the_task_timeout() -> None:
    assert compile_budget(1.0) == 2.0
    assert compile_budget(0.2) == 2.0
    assert compile_budget(30.0) == 31.0
    assert compile_budget(None) == 60.0
