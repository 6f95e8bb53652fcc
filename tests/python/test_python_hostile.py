"""Hostile Python tasks in the wasm tier: every guard holds and nothing runs on the host."""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import CodeType

import pytest

from wasmbox import Result, Sandbox, Status, Task
from wasmbox.models import TierName


def run(sb: Sandbox, source: str, **fields: object) -> Result:
    return sb.run(Task.python(source, tier=TierName.WASM, **fields))


def test_infinite_loop_times_out(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "while True:\n    pass\n", resources={"timeout": 0.5})
    assert r.status is Status.TIMEOUT


def test_fuel_budget_stops_a_busy_task(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "while True:\n    pass\n", resources={"fuel": 50_000_000})
    assert r.status is Status.OUT_OF_FUEL


def test_sleep_past_the_deadline_times_out(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import time\ntime.sleep(60)\n", resources={"timeout": 0.5})
    assert r.status is Status.TIMEOUT


def test_memory_bomb_is_memory_exceeded(py_sandbox: Sandbox) -> None:
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"
    r = run(py_sandbox, source, resources={"memory": "96MiB"})
    assert r.status is Status.MEMORY_EXCEEDED
    assert "MemoryError" in r.stderr


def test_single_huge_allocation_is_memory_exceeded(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "x = bytearray(1 << 30)\n", resources={"memory": "96MiB"})
    assert r.status is Status.MEMORY_EXCEEDED


def test_python_recursion_bomb_is_a_recursion_error(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def f():\n    return f()\nf()\n")
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith("RecursionError")


def test_c_stack_exhaustion_crashes_the_guest_only(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import json\njson.loads('[' * 200000 + ']' * 200000)\n")
    assert r.status is Status.CRASHED
    assert r.trap == "stack_overflow"
    assert run(py_sandbox, "def main(inp):\n    return 1\n").output == 1


def test_stdout_flood_is_output_rejected(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "while True:\n    print('x' * 4096)\n")
    assert r.status is Status.OUTPUT_REJECTED
    assert r.reason is not None and "stdout flood" in r.reason


def test_stderr_flood_is_output_rejected(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import sys\nwhile True:\n    sys.stderr.write('e' * 4096)\n")
    assert r.status is Status.OUTPUT_REJECTED


def test_output_file_flood_is_output_rejected(py_sandbox: Sandbox) -> None:
    source = ("i = 0\nwhile True:\n    open(f'/task/output/f{i}', 'w').write('x')\n"
              "    i += 1\n")
    r = run(py_sandbox, source)
    assert r.status is Status.OUTPUT_REJECTED


def test_oversized_return_value_is_output_rejected(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp):\n    return 'x' * (9 * 1024 * 1024)\n")
    assert r.status is Status.OUTPUT_REJECTED


@pytest.mark.parametrize("source", [
    "open('/etc/passwd').read()",
    "import os\nos.listdir('/')",
    "import pathlib\npathlib.Path('/task/../../etc/passwd').read_text()",
    "open('/task/output/../../../../etc/passwd').read()",
    "import os\nos.symlink('/etc/passwd', '/task/output/p')\nopen('/task/output/p').read()",
])
def test_host_files_are_unreachable(py_sandbox: Sandbox, source: str) -> None:
    r = run(py_sandbox, source + "\n")
    assert r.status is Status.FAILED
    assert "root:" not in r.stdout + r.stderr


def test_input_is_read_only(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "open('/task/input.json', 'w').write('{}')\n", input={"a": 1})
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith(("PermissionError", "OSError"))


@pytest.mark.parametrize("module", ["socket", "subprocess", "ctypes", "_socket", "select"])
def test_dangerous_modules_do_not_import(py_sandbox: Sandbox, module: str) -> None:
    r = run(py_sandbox, f"import {module}\n")
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith("ModuleNotFoundError")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    yield srv
    srv.close()


def test_network_is_unreachable_even_via_builtin_socket(
    py_sandbox: Sandbox, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    source = (
        "import _imp, importlib.machinery\n"
        "s = _imp.create_builtin(importlib.machinery.ModuleSpec('_socket', None))\n"
        "k = s.socket(s.AF_INET, s.SOCK_STREAM)\n"
        f"k.connect(('127.0.0.1', {port}))\n"
    )
    r = run(py_sandbox, source)
    assert r.status is Status.FAILED
    with pytest.raises(TimeoutError):
        listener.accept()


def test_process_spawning_fails_inside_the_guest(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import os\nos.system('touch /tmp/pwned')\n")
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith("AttributeError")


# --- no task source ever reaches the host interpreter ---------------------------------------

_SEEN: list[str] = []
_MARKER: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if not _MARKER or event not in ("compile", "exec"):
        return
    marker = _MARKER[0]
    target = args[0] if args else None
    text = repr(target.co_consts) if isinstance(target, CodeType) else str(target)
    if marker in text:
        _SEEN.append(event)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it only acts while a marker is set


def test_task_source_is_never_compiled_or_run_on_the_host(
    py_sandbox: Sandbox, tmp_path: Path
) -> None:
    marker = f"wasmbox-host-marker-{uuid.uuid4().hex}"
    host_file = tmp_path / "escaped"
    source = (
        f"MARK = {marker!r}\n"
        f"open({str(host_file)!r}, 'w').write(MARK)\n"
    )
    _MARKER.append(marker)
    try:
        r = run(py_sandbox, source)
    finally:
        _MARKER.clear()
    assert r.status is Status.FAILED  # the host path does not exist inside the guest
    assert not host_file.exists()
    assert _SEEN == []


def test_audit_hook_would_see_host_execution() -> None:
    # The guard above is only meaningful if the hook sees a host-side compile of the marker.
    marker = f"wasmbox-host-marker-{uuid.uuid4().hex}"
    _MARKER.append(marker)
    try:
        compile(f"X = {marker!r}\n", "<probe>", "exec")
    finally:
        _MARKER.clear()
    assert _SEEN.pop() == "compile"
