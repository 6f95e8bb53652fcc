"""The VM tier's I/O paths: input in, outputs and streams out, exit codes, Python tasks."""

from __future__ import annotations

import json

import pytest

from wasmbox import Sandbox, Task
from wasmbox.models import Status
from wasmbox.tiers.vm.assets import AssetReport

pytestmark = pytest.mark.vm


def command(*argv: str, **fields: object) -> Task:
    return Task.command(list(argv), tier="vm", **fields)  # type: ignore[arg-type]


def test_stdout_and_zero_exit_complete(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("echo", "hello from the guest"))
    assert result.status is Status.COMPLETED
    assert result.exit_code == 0
    assert result.stdout == "hello from the guest\n"


def test_nonzero_exit_code_is_failed_with_stderr(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("sh", "-c", "echo oops >&2; exit 3"))
    assert result.status is Status.FAILED
    assert result.exit_code == 3
    assert result.stderr == "oops\n"


def test_input_arrives_in_task_dir(vm_sandbox: Sandbox) -> None:
    payload = {"xs": [1, 2, 3], "name": "vm"}
    result = vm_sandbox.run(command("cat", "/task/input.json", input=payload))
    assert result.status is Status.COMPLETED
    assert json.loads(result.stdout) == payload


def test_output_files_come_back(vm_sandbox: Sandbox) -> None:
    script = (
        "mkdir -p /task/output/sub && echo '{\"ok\": true}' > /task/output/result.json"
        " && printf data > /task/output/sub/file.bin"
    )
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.COMPLETED
    assert result.output == {"ok": True}
    assert result.files["sub/file.bin"] == b"data"


def test_task_runs_unprivileged(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("id", "-u"))
    assert result.stdout.strip() == "1000"


def test_env_reaches_the_task(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("sh", "-c", "echo $GREETING", env={"GREETING": "hi"}))
    assert result.stdout == "hi\n"


@pytest.fixture
def python_image(vm_assets: AssetReport) -> None:
    if vm_assets.assets.python_image is None:
        pytest.skip("no python image: the host has no /usr/bin/python3")


@pytest.mark.usefixtures("python_image")
def test_python_task_returns_its_result(vm_sandbox: Sandbox) -> None:
    source = "def main(inp):\n    return {'sum': sum(inp['xs'])}\n"
    result = vm_sandbox.run(Task.python(source, input={"xs": [1, 2, 39]}, tier="vm"))
    assert result.status is Status.COMPLETED
    assert result.output == {"sum": 42}


@pytest.mark.usefixtures("python_image")
def test_python_exception_fails_with_traceback(vm_sandbox: Sandbox) -> None:
    source = "def main(inp):\n    raise ValueError('boom')\n"
    result = vm_sandbox.run(Task.python(source, tier="vm"))
    assert result.status is Status.FAILED
    assert result.exit_code == 1
    assert "ValueError: boom" in result.stderr
