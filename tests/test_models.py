"""Models: parsing of sizes and durations, policy files, contradictions, task shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from wasmbox import (
    AnomalyRule,
    ConfigError,
    Event,
    Metrics,
    Policy,
    Resources,
    Result,
    Status,
    Task,
    TierName,
)
from wasmbox.errors import InputRejected
from wasmbox.models import MiB, parse_duration, parse_size
from wasmbox.service.schemas import ResultView


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64M", 64 * MiB), ("64MiB", 64 * MiB), ("64MB", 64_000_000), ("1k", 1024), ("512", 512)],
)
def test_sizes_accept_binary_and_decimal_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("3", 3.0)]
)
def test_durations_accept_units(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


def test_a_garbage_size_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValidationError, match="not a size"):
        Resources(memory="lots")


def test_policy_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'name = "strict"\n[limits]\nmemory = "32MiB"\nfuel = 1000000\n'
        '[timeouts]\nrun = "2s"\n[output]\ndeny_patterns = ["SECRET-[0-9]+"]\n'
    )
    policy = Policy.from_toml(path)
    assert policy.name == "strict"
    assert policy.limits.memory == 32 * MiB
    assert policy.timeouts.run == 2.0
    assert policy.output.deny_patterns == ("SECRET-[0-9]+",)


def test_a_misspelt_policy_field_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"limits\.memroy"):
        Policy.from_toml_text("[limits]\nmemroy = 1\n")


def test_invalid_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        Policy.from_toml_text("[limits\n")


def test_a_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy"):
        Policy.from_toml(tmp_path / "absent.toml")


def test_unbounded_fuel_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ValidationError, match="allow_unbounded"):
        Policy.model_validate({"limits": {"fuel": None}})
    assert Policy.model_validate({"limits": {"fuel": None}, "allow_unbounded": True})


def test_unbounded_run_time_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ValidationError, match="allow_unbounded"):
        Policy.model_validate({"timeouts": {"run": None}})


def test_min_isolation_above_every_allowed_tier_is_a_contradiction() -> None:
    with pytest.raises(ValidationError, match="excludes every allowed tier"):
        Policy(allowed_tiers=frozenset({TierName.WASM}), min_isolation=TierName.VM)


def test_per_file_cap_above_total_cap_is_a_contradiction() -> None:
    with pytest.raises(ValidationError, match="max_file_bytes"):
        Policy.model_validate({"output": {"max_file_bytes": 10, "max_total_bytes": 5}})


def test_a_bad_deny_regex_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not a regex"):
        Policy.model_validate({"output": {"deny_patterns": ["("]}})


@pytest.mark.parametrize("mount", ["/task", "/task/output", "relative", "/a/../b"])
def test_mounts_cannot_shadow_the_task_dir_or_escape(mount: str) -> None:
    with pytest.raises(ValidationError):
        Policy.model_validate({"filesystem": {"readonly": {mount: "/usr"}}})


def test_a_wasm_task_needs_exactly_one_module() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        Task(kind="wasm")


def test_task_python_reads_a_path(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("def main(i):\n    return i\n")
    assert Task.python(script).source == script.read_text()
    assert Task.python("print(1)").source == "print(1)"


def test_a_string_naming_a_file_is_source_not_a_path(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("secret = 1\n")
    assert Task.python(str(script)).source == str(script)


def test_command_tasks_default_to_the_container_tier() -> None:
    assert Task.command(["true"]).tier is TierName.CONTAINER


def test_an_unreadable_python_path_is_a_typed_error(tmp_path: Path) -> None:
    from wasmbox import ModuleRejected

    with pytest.raises(ModuleRejected, match="cannot read Python source"):
        Task.python(tmp_path / "absent.py")


@pytest.mark.parametrize("fields", [
    {"source": "x = '\ud800'"},
    {"source": "x = 1", "entry": "\udc80"},
    {"source": "x = 1", "env": {"A": "\ud800"}},
    {"source": "x = 1", "env": {"\ud800": "a"}},
])
def test_text_that_is_not_valid_unicode_is_input_rejected(fields: dict[str, Any]) -> None:
    source = fields.pop("source")
    with pytest.raises(InputRejected, match="not valid Unicode"):
        Task.python(source, **fields)


def test_a_command_argv_that_is_not_valid_unicode_is_input_rejected() -> None:
    with pytest.raises(InputRejected, match="not valid Unicode"):
        Task.command(["/bin/echo", "\udcff"])


def test_argv_text_that_is_not_valid_unicode_is_input_rejected() -> None:
    with pytest.raises(InputRejected, match="not valid Unicode"):
        Task.wasm(b"\0asm\x01\0\0\0", args=("\ud800",))
    with pytest.raises(InputRejected, match="not valid Unicode"):
        Task.command(["echo", "\ud800"])


def _a_result_with_every_field_set() -> Result:
    return Result(
        task_id="t", run_id="r", tier=TierName.CONTAINER, status=Status.ANOMALY, exit_code=3,
        trap="trap", reason="why", output={"k": [1]}, files={"a.txt": b"abc"}, stdout="o",
        stderr="e", stdout_truncated=True, stderr_truncated=True, metrics=Metrics(run_s=1.5),
        events=(Event(rule=AnomalyRule.OUTPUT_FLOOD, message="m", at_s=0.5, killed=True),),
        escalated_from=TierName.WASM, escalation_reason="needs a network", warnings=("w",),
    )


def test_every_result_field_is_in_the_api_result_view() -> None:
    result = _a_result_with_every_field_set()
    unset = [name for name in Result.model_fields
             if getattr(result, name) == Result.model_fields[name].get_default(
                 call_default_factory=True)]
    assert unset == [], "set every Result field here so the view is checked for each"
    view = ResultView.of(result, {"a.txt": 3})
    assert list(ResultView.model_fields) == list(Result.model_fields)
    shown = view.model_dump(mode="json")
    assert shown.pop("files") == {"a.txt": 3}
    assert shown == result.model_dump(mode="json", exclude={"files"})
