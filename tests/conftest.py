"""Shared fixtures: built guests, a sandbox with a private module cache, leak snapshots."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox
from wasmbox.tiers.base import TierName
from wasmbox.tiers.wasm import WasmTier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guests.build import build, find_compiler  # noqa: E402

GUEST_OUT = ROOT / "build" / "guests"


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    """Every guest compiled to wasm32-wasi (built once per session, skipped if up to date)."""
    try:
        find_compiler()
    except RuntimeError as exc:
        pytest.skip(f"no WASI C compiler: {exc}")
    return build(GUEST_OUT)


@pytest.fixture(scope="session")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled-module cache private to this test session."""
    return tmp_path_factory.mktemp("module-cache")


def _make_sandbox(cache: Path, policy: Policy | None = None) -> Sandbox:
    return Sandbox(policy, tiers={TierName.WASM: lambda: WasmTier(cache)})


@pytest.fixture
def make_sandbox(module_cache: Path) -> Callable[..., Sandbox]:
    """Build a Sandbox (optionally with a policy and its own cache dir) that caches privately."""

    def make(policy: Policy | None = None, cache: Path | None = None) -> Sandbox:
        return _make_sandbox(cache or module_cache, policy)

    return make


@pytest.fixture
def sandbox(module_cache: Path) -> Iterator[Sandbox]:
    """A default-policy sandbox, closed after the test."""
    with _make_sandbox(module_cache) as sb:
        yield sb
