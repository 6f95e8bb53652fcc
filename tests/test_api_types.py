"""The Python API's edges: typed factories, typed errors, errors that cross process boundaries."""

from __future__ import annotations

import pickle
import re

import pytest

from wasmbox import InputRejected, InvalidTask, Resources, SandboxError, Task
from wasmbox.errors import HostFailure, PolicyViolation, TierUnavailable


def test_command_refuses_a_string_argv_and_suggests_the_split() -> None:
    with pytest.raises(InvalidTask, match=r"\['ls', '-la'\]"):
        Task.command("ls -la")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Task.wasm("m.wasm", tier="nowhere"),
        lambda: Task.python("x = 1", entry=3),  # type: ignore[arg-type]
        lambda: Task.wasm(b"\0asm", args="one string"),
        lambda: Task.command(["true"], env={"A": 1}),
        lambda: Task.wasm("m.wasm", sha256="not-hex"),
    ],
)
def test_bad_fields_raise_a_sandbox_error_not_a_pydantic_one(build: object) -> None:
    with pytest.raises(InvalidTask) as info:
        build()  # type: ignore[operator]
    assert isinstance(info.value, InputRejected) and isinstance(info.value, SandboxError)


def test_unknown_keywords_are_type_errors() -> None:
    with pytest.raises(TypeError):
        Task.wasm("m.wasm", resorces=Resources())  # type: ignore[call-arg]


def test_resources_accept_the_readme_strings() -> None:
    r = Resources(memory="64M", timeout="250ms")
    assert r.memory == 64 * 1024 * 1024 and r.timeout == pytest.approx(0.25)


@pytest.mark.parametrize(
    "error",
    [TierUnavailable("vm", "no kvm"), PolicyViolation("limits.memory", "too big"),
     InvalidTask("bad"), HostFailure("disk")],
)
def test_errors_survive_pickling(error: Exception) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)


def test_python_args_are_refused_not_dropped() -> None:
    with pytest.raises(InvalidTask, match="args"):
        Task.python("def main(i):\n    return i", args=["x"])
    assert Task.python("x = 1", args=()).args == ()


@pytest.mark.parametrize(
    ("text", "hint"),
    [('[limits]\nmemroy = "1M"\n', "limits.memroy: unknown key (did you mean 'memory'?)"),
     ('[output]\nmax_fles = 3\n', "did you mean 'max_files'?"),
     ('alowed_tiers = ["wasm"]\n', "did you mean 'allowed_tiers'?")],
)
def test_policy_typos_name_the_nearest_key(text: str, hint: str) -> None:
    from wasmbox import ConfigError, Policy

    with pytest.raises(ConfigError, match=re.escape(hint)):
        Policy.from_toml_text(text)
