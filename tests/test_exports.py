"""The public API is exactly what `wasmbox/__init__.py` exports (as httpx and trio check)."""

from __future__ import annotations

import inspect
import pickle

import pytest

import wasmbox

PUBLIC = {
    "AnomalyRule", "Availability", "ConfigError", "DenyAction", "Event", "FilesystemPolicy",
    "HostFailure", "InputRejected", "InvalidTask", "Limits", "Metrics", "ModuleRejected",
    "MonitorPolicy", "NetworkPolicy", "OutputPolicy", "Plan", "Policy", "PolicyViolation",
    "PythonPolicy", "Resources", "Result", "Sandbox", "SandboxClosed", "SandboxError",
    "Status", "Task", "TaskKind", "TierName", "TierUnavailable", "TimeoutPolicy", "WasiPolicy",
    "apply",
}


def test_the_exports_are_the_public_api() -> None:
    assert set(wasmbox.__all__) == PUBLIC
    assert sorted(wasmbox.__all__) == wasmbox.__all__


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_export_resolves_and_is_documented(name: str) -> None:
    obj = getattr(wasmbox, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"


def _errors() -> list[type[wasmbox.SandboxError]]:
    found, todo = [], [wasmbox.SandboxError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("cls", _errors(), ids=lambda c: c.__name__)
def test_every_error_survives_a_pickle_round_trip(cls: type[wasmbox.SandboxError]) -> None:
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    args = [f"{p.name}-value" for p in params] or ["a message"]
    error = cls(*args)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error) and vars(back) == vars(error)
