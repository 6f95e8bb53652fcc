"""Fixtures for Python tasks in the wasm tier: the interpreter is built once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Task, apply
from wasmbox.models import TierName
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.python import PythonRuntime


@pytest.fixture(scope="session")
def python_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache holding the CPython component, built (and compiled) once per session.

    Skips only when componentize-py itself is missing.
    """
    cache = tmp_path_factory.mktemp("python-cache")
    with WasmTier(cache) as tier:
        available = PythonRuntime(cache, lambda flavour: tier._engine_for(flavour)[0])
        report = available.availability()
        if not report.ok:
            pytest.skip(report.reason)
        tier.prepare(apply(Policy(), Task.python("pass")))
    return cache


@pytest.fixture(scope="module")
def py_sandbox(python_cache: Path) -> Iterator[Sandbox]:
    """A default-policy sandbox sharing the session's Python cache."""
    with Sandbox(tiers={TierName.WASM: lambda: WasmTier(python_cache)}) as sb:
        yield sb


@pytest.fixture
def make_py_sandbox(python_cache: Path) -> Iterator[Callable[[Policy], Sandbox]]:
    """Sandboxes with a given policy, closed after the test."""
    made: list[Sandbox] = []

    def make(policy: Policy) -> Sandbox:
        sb = Sandbox(policy, tiers={TierName.WASM: lambda: WasmTier(python_cache)})
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()
