"""README promises that had no test of their own (issue 20): each fails when the promise breaks.

The full promise -> test table is in the H3 report; these fill its gaps for the wasm tier,
the CLI, policy files and the service.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service._support import ALICE, BOB, auth, config_data
from wasmbox import (
    ConfigError,
    InputRejected,
    ModuleRejected,
    Policy,
    PolicyViolation,
    Sandbox,
    SandboxError,
    Status,
    Task,
    TierUnavailable,
)
from wasmbox.cli import EXIT_GUEST_FAULT, EXIT_HOST_ERROR, EXIT_OK, main
from wasmbox.models import FilesystemPolicy
from wasmbox.service import ServiceConfig, create_app


def test_every_host_error_is_a_sandbox_error() -> None:
    for error in (PolicyViolation, InputRejected, ModuleRejected, ConfigError, TierUnavailable):
        assert issubclass(error, SandboxError), error
    assert PolicyViolation("limits.memory", "too much").rule == "limits.memory"


# --- [filesystem] mounts in the wasm tier -----------------------------------------------

MOUNT_PROBE = """
def main(inp):
    seen = open('/data/fact.txt').read()
    try:
        open('/data/new.txt', 'w').write('x')
        wrote = True
    except OSError:
        wrote = False
    open('/scratch/made.txt', 'w').write('from the guest')
    return {'seen': seen, 'wrote_readonly': wrote}
"""


def test_filesystem_mounts_are_visible_read_only_or_writable_as_the_policy_says(
    make_sandbox: Callable[..., Sandbox], tmp_path: Path
) -> None:
    data, scratch = tmp_path / "data", tmp_path / "scratch"
    data.mkdir()
    scratch.mkdir()
    (data / "fact.txt").write_text("42")
    policy = Policy(filesystem=FilesystemPolicy(readonly={"/data": data},
                                                writable={"/scratch": scratch}))
    with make_sandbox(policy) as sb:
        result = sb.run(Task.python(MOUNT_PROBE, tier="wasm"))
    assert result.status is Status.COMPLETED, result.stderr
    assert result.output == {"seen": "42", "wrote_readonly": False}
    assert not (data / "new.txt").exists()
    assert (scratch / "made.txt").read_text() == "from the guest"


def test_without_a_mount_the_host_directory_is_not_there(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    result = sandbox.run(Task.python(MOUNT_PROBE, tier="wasm"))
    assert result.status is Status.FAILED
    assert "FileNotFoundError" in result.stderr


# --- the CLI's documented flags ---------------------------------------------------------

@pytest.fixture
def private_cache(monkeypatch: pytest.MonkeyPatch, module_cache: Path) -> None:
    monkeypatch.setenv("WASMBOX_CACHE_DIR", str(module_cache))


@pytest.mark.usefixtures("private_cache")
def test_cli_runs_python_source_from_a_py_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "task.py"
    task.write_text("def main(inp):\n    return {'sum': sum(inp['xs'])}\n")
    assert main(["run", str(task), "--input-json", '{"xs": [1, 2]}', "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["output"] == {"sum": 3}


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize(("guest", "flags", "status"), [
    ("fuel_burner", ["--fuel", "100000"], "out_of_fuel"),
    ("memory_bomb", ["--memory", "32M"], "memory_exceeded"),
])
def test_cli_limit_flags_reach_the_run(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str], guest: str,
    flags: list[str], status: str,
) -> None:
    assert main(["run", str(guests[guest]), *flags, "--timeout", "10s"]) == EXIT_GUEST_FAULT
    assert f"status={status}" in capsys.readouterr().err


def test_wasmbox_serve_refuses_a_config_without_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "service.toml"
    config.write_text("[service]\nworkers = 1\n")
    assert main(["serve", "--config", str(config), "--port", "1"]) == EXIT_HOST_ERROR
    assert "no [tokens" in capsys.readouterr().err


def test_a_misspelt_service_config_field_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="max_concurent"):
        ServiceConfig.from_dict({"tokens": {"t": {"secret": "s", "max_concurent": 2}}})


# --- service endpoints without a test of their own ------------------------------------

@pytest.fixture
def service(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceConfig.from_dict(
            config_data(tmp_path / "tasks.db", workers=0)))) as client:
        yield client


def test_policies_lists_what_the_token_may_name_default_first(service: TestClient) -> None:
    assert service.get("/v1/policies", headers=auth(ALICE)).json() == {
        "policies": ["default", "strict"]}
    assert service.get("/v1/policies", headers=auth(BOB)).json() == {"policies": ["default"]}
    assert service.get("/v1/policies").status_code == 401


def test_healthz_answers_without_a_token(service: TestClient) -> None:
    response = service.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
