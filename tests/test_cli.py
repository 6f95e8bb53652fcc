"""The command line, driven through its entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wasmbox.cli import EXIT_GUEST_FAULT, EXIT_HOST_ERROR, EXIT_OK, main


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, module_cache: Path) -> None:
    monkeypatch.setenv("WASMBOX_CACHE_DIR", str(module_cache))


def test_run_writes_outputs_and_exits_zero(
    guests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["run", str(guests["json_transform"]), "--input-json", '{"xs": [2, 3]}',
                 "--output", str(out)])
    assert code == EXIT_OK
    assert json.loads((out / "result.json").read_text()) == {"sum": 5, "count": 2, "max": 3}
    assert "status=completed" in capsys.readouterr().err


def test_run_json_prints_the_result(
    guests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infile = tmp_path / "in.json"
    infile.write_text('{"text": "one two"}')
    assert main(["run", str(guests["wordcount"]), "--input", str(infile), "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "completed"
    assert result["output"]["words"] == 2


def test_a_timeout_exits_with_the_guest_fault_code(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(guests["infinite_loop"]), "--timeout", "100ms"])
    assert code == EXIT_GUEST_FAULT
    assert "status=timeout" in capsys.readouterr().err


def test_a_bad_policy_file_is_a_host_error(
    guests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\nmemory = 'a lot'\n")
    assert main(["run", str(guests["hello"]), "--policy", str(policy)]) == EXIT_HOST_ERROR
    assert "ConfigError" in capsys.readouterr().err


def test_malformed_input_json_is_a_host_error(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(guests["hello"]), "--input-json", "{nope"]) == EXIT_HOST_ERROR
    assert "InputRejected" in capsys.readouterr().err


def test_doctor_reports_the_wasm_tier(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == EXIT_OK
    report = {entry["tier"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert report["wasm"]["ok"] is True
    assert set(report) == {"wasm", "container", "vm"}
