"""Shared fixtures: built guests, a sandbox with a private module cache, leak snapshots."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


@pytest.fixture(scope="session", autouse=True)
def private_workspace_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Workspaces of this session in a directory of their own, so leak checks see only ours."""
    root = Path(tempfile.mkdtemp(prefix="wasmbox-tests-", dir=_memory_dir()))
    previous = os.environ.get("WASMBOX_TMPDIR")
    os.environ["WASMBOX_TMPDIR"] = str(root)
    try:
        yield root
    finally:
        if previous is None:
            os.environ.pop("WASMBOX_TMPDIR", None)
        else:
            os.environ["WASMBOX_TMPDIR"] = previous
        shutil.rmtree(root, ignore_errors=True)


def _memory_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(scope="session")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled-module cache private to this test session, seeded with the Python
    interpreter when `wasmbox python build` (``nox -s tests`` runs it) has built one."""
    cache = tmp_path_factory.mktemp("module-cache")
    from wasmbox.tiers.wasm.cache import default_cache_dir
    from wasmbox.tiers.wasm.python import app_key

    for built in default_cache_dir().glob(f"{app_key()}*"):
        if built.suffix in (".wasm", ".cwasm") and built.is_file():
            shutil.copyfile(built, cache / built.name)
    return cache


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
