"""Fixtures shared by the threat tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wasmbox import Policy, Sandbox
from wasmbox.models import TierName
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.python import PythonRuntime


@pytest.fixture(scope="module")
def python_wasm_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox limited to the wasm tier, with the Python interpreter built once for every
    threat test (skips only when the pinned componentize-py is missing)."""
    cache = tmp_path_factory.getbasetemp() / "adversarial-python-cache"
    cache.mkdir(exist_ok=True)
    with WasmTier(cache) as tier:
        report = PythonRuntime(cache, lambda f: tier._engine_for(f)[0]).availability()
        if not report.ok:
            pytest.skip(report.reason)
    policy = Policy.model_validate({"allowed_tiers": ["wasm"]})
    with Sandbox(policy, tiers={TierName.WASM: lambda: WasmTier(cache)}) as sb:
        yield sb
