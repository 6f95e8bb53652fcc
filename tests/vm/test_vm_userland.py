"""A command in the VM sees the userland a container gives it: the host's /usr (and the
merged-/usr links /bin, /lib, /sbin), python3, coreutils, with the same /task layout."""

from __future__ import annotations

import json

import pytest

from wasmbox import Sandbox, Task
from wasmbox.models import Status

pytestmark = pytest.mark.vm


def command(*argv: str, **fields: object) -> Task:
    return Task.command(list(argv), tier="vm", **fields)  # type: ignore[arg-type]


def test_python3_runs_as_a_command(vm_sandbox: Sandbox) -> None:
    script = "import json, sys; print(json.dumps([sys.version_info[0], sys.executable]))"
    result = vm_sandbox.run(command("python3", "-c", script))
    assert result.status is Status.COMPLETED, result
    major, executable = json.loads(result.stdout)
    assert major == 3 and executable.startswith("/usr/bin/python3")


def test_usr_bin_env_finds_programs_on_the_container_path(vm_sandbox: Sandbox) -> None:
    result = vm_sandbox.run(command("/usr/bin/env"))
    assert result.status is Status.COMPLETED, result
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    assert env["HOME"] == "/tmp"


def test_a_shell_pipeline_uses_the_hosts_coreutils(vm_sandbox: Sandbox) -> None:
    script = ("printf 'b\\na\\nc\\na\\n' | sort | uniq -c | tr -s ' ' | sed 's/^ //' ; "
              "readlink -f /bin/sort; sort --version | head -1")
    result = vm_sandbox.run(command("sh", "-c", script))
    assert result.status is Status.COMPLETED, result
    lines = result.stdout.splitlines()
    assert lines[:3] == ["2 a", "1 b", "1 c"]
    assert lines[3] == "/usr/bin/sort"  # /bin is merged-/usr's link, as on the host
    assert "GNU coreutils" in lines[4]  # not busybox


def test_the_task_layout_matches_a_container(vm_sandbox: Sandbox) -> None:
    script = ("cd /task && cat input.json && echo && pwd && id -u && "
              "echo '{\"n\": 1}' > output/result.json && echo scratch > /tmp/x && cat /tmp/x")
    result = vm_sandbox.run(command("sh", "-c", script, input={"k": "v"}))
    assert result.status is Status.COMPLETED, result
    payload, *rest = result.stdout.splitlines()
    assert json.loads(payload) == {"k": "v"}
    assert rest == ["/task", "1000", "scratch"]
    assert result.output == {"n": 1}
