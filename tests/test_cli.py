"""The command line, driven through its entry point."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wasmbox.cli import EXIT_GUEST_FAULT, EXIT_HOST_ERROR, EXIT_OK, EXIT_USAGE, _parser, main

ROOT = Path(__file__).resolve().parents[1]


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


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in a child process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "wasmbox.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=cwd or ROOT, env=env, check=False)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--memory", "lots"), ("--timeout", "soon"), ("--fuel", "1.5e0x"), ("--fuel", "2.5"),
     ("--memory", "0"), ("--timeout", "-1s"), ("--fuel", "-3")],
)
def test_bad_arguments_are_one_line_usage_errors(
    guests: dict[str, Path], option: str, value: str
) -> None:
    proc = _cli("run", str(guests["hello"]), option, value)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option.lstrip("-") in lines[0], lines


def test_bad_arguments_under_json_are_json(guests: dict[str, Path]) -> None:
    proc = _cli("run", str(guests["hello"]), "--memory", "lots", "--json")
    assert proc.returncode == EXIT_USAGE
    err = json.loads(proc.stdout)
    assert err["error"] == "UsageError" and "lots" in err["message"]
    assert err["exit_code"] == EXIT_USAGE


def test_host_errors_under_json_are_json(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(guests["hello"]), "--input-json", "{nope", "--json"]) == EXIT_HOST_ERROR
    err = json.loads(capsys.readouterr().out)
    assert err["error"] == "InputRejected"


def test_exit_codes_are_distinct() -> None:
    assert len({EXIT_OK, EXIT_GUEST_FAULT, EXIT_USAGE, EXIT_HOST_ERROR}) == 4


def test_scientific_fuel_is_accepted_when_whole(
    guests: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(guests["hello"]), "--fuel", "1e9", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["status"] == "completed"


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("wasmbox ")


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_parsers(child)
    return found


def test_every_option_has_help() -> None:
    for parser in _all_parsers(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action.dest)


def test_bench_help_names_the_command() -> None:
    proc = _cli("bench", "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: wasmbox bench")


def test_a_file_that_is_neither_wasm_nor_python_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert main(["run", str(script)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "neither a WebAssembly module" in err and "magic" not in err


def test_arg_for_python_is_refused_not_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "t.py"
    src.write_text("def main(inp):\n    return {}\n")
    assert main(["run", str(src), "--arg", "x"]) == EXIT_USAGE
    assert "--arg" in capsys.readouterr().err


def test_run_needs_code_or_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == EXIT_USAGE
    assert main(["run", "--"]) == EXIT_USAGE


def test_native_command_after_double_dash_runs_in_a_container(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("neither crun nor runc is installed")
    code = main(["run", "--json", "--", "/bin/sh", "-c", "echo hi from $0"])
    result = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, result
    assert result["tier"] == "container"
    assert result["stdout"].strip() == "hi from /bin/sh"


def test_python_build_and_status_report_the_interpreter(
    module_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["python", "build"]) == EXIT_OK
    assert "ready" in capsys.readouterr().err
    assert main(["python", "status", "--json"]) == EXIT_OK
    state = json.loads(capsys.readouterr().out)
    assert state["built"] is True and state["path"].startswith(str(module_cache))
    assert main(["doctor", "--json"]) == EXIT_OK
    wasm = {e["tier"]: e for e in json.loads(capsys.readouterr().out)}["wasm"]
    assert wasm["details"]["python_interpreter"]["built"] is True
