"""The public API is exactly what `wasmbox/__init__.py` exports (as httpx and trio check)."""

from __future__ import annotations

import ast
import inspect
import pickle
from pathlib import Path

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


# Where users import from; every other module is internal: underscored, or its docstring
# says "Internal" (guest code, which never runs on the host, is neither).
PUBLIC_MODULES = {
    "wasmbox", "wasmbox.__main__", "wasmbox.models", "wasmbox.errors", "wasmbox.pool",
    "wasmbox.distributed", "wasmbox.service", "wasmbox.service.__main__", "wasmbox.tiers",
    "wasmbox.tiers.base", "wasmbox.tiers.wasm", "wasmbox.tiers.container", "wasmbox.tiers.vm",
}
GUEST_MODULES = {
    "wasmbox.runner.runner", "wasmbox.tiers.wasm.python_app", "wasmbox.tiers.wasm.python_app.app",
}
# Internal modules whose docstrings do not say so yet (each is being edited elsewhere; mark
# one "Internal: ..." and drop it from here). Nothing may be added: a new internal module is
# underscored or says so from the start.
NOT_YET_MARKED = {
    "wasmbox.lifecycle", "wasmbox.monitor", "wasmbox.policy", "wasmbox.runner",
    "wasmbox.sandbox", "wasmbox.telemetry", "wasmbox.workspace",
    "wasmbox.service.config", "wasmbox.service.limits", "wasmbox.service.metrics",
    "wasmbox.service.schemas",
    "wasmbox.tiers.container.cgroups", "wasmbox.tiers.container.instance",
    "wasmbox.tiers.container.pool", "wasmbox.tiers.container.reaper",
    "wasmbox.tiers.container.runs", "wasmbox.tiers.container.runtime",
    "wasmbox.tiers.container.seccomp", "wasmbox.tiers.container.tier",
    "wasmbox.tiers.vm.assets", "wasmbox.tiers.vm.cpio", "wasmbox.tiers.vm.guest",
    "wasmbox.tiers.vm.janitor", "wasmbox.tiers.vm.machine", "wasmbox.tiers.vm.pool",
    "wasmbox.tiers.vm.qmp", "wasmbox.tiers.vm.snapshot", "wasmbox.tiers.vm.tier",
    "wasmbox.tiers.wasm.cache", "wasmbox.tiers.wasm.clock_shim",
    "wasmbox.tiers.wasm.compile_worker", "wasmbox.tiers.wasm.engine",
    "wasmbox.tiers.wasm.run", "wasmbox.tiers.wasm.source_scan",
    "wasmbox.tiers.wasm.tier",
}


def _module_docstrings() -> dict[str, str]:
    root = Path(wasmbox.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = ast.get_docstring(ast.parse(path.read_text("utf-8"))) or ""
    return found


def test_every_module_is_public_underscored_or_says_it_is_internal() -> None:
    unmarked = {
        name for name, doc in _module_docstrings().items()
        if name not in PUBLIC_MODULES | GUEST_MODULES
        and not any(part.startswith("_") and part != "__main__" for part in name.split("."))
        and "Internal" not in doc
    }
    assert unmarked - NOT_YET_MARKED == set(), "underscore these or document them as internal"
    assert NOT_YET_MARKED - unmarked == set(), "marked now: drop them from NOT_YET_MARKED"
