"""Threat: the contents of a ``policy.python.packages`` entry reach outside it or stall the host.

The entries are host configuration, but what is inside them (a downloaded wheel, a directory
``pip`` filled from an index) is not the operator's own work. The host looks inside them to
route tasks (C extensions or not) and to mount them, so: a symlink in a package directory
that resolves outside it is refused on every tier (a tier would show the task something
other than what was listed); a wheel member with an absolute path or ``..`` is refused
before anything is written; the walk follows no symlink and stops at bounded depth and
entry count (a loop, a deep tree or a huge tree is an error, not a hang or a recursion);
unpacked wheels are never left writable by other host users (their code runs in every
sandbox that lists them).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.container import conftest as container_fixtures
from wasmbox import Policy, Sandbox, Task
from wasmbox import packages as pk
from wasmbox.errors import ConfigError
from wasmbox.models import PythonPolicy, TierName
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.wasm import WasmTier

container_ready = container_fixtures.container_ready


@pytest.fixture(autouse=True)
def _fresh_scans() -> Iterator[None]:
    pk.clear_cache()
    yield
    pk.clear_cache()


def _package_dir(root: Path) -> Path:
    pkg = root / "site"
    (pkg / "good").mkdir(parents=True)
    (pkg / "good" / "__init__.py").write_text("X = 1\n")
    pkg.chmod(0o755)
    return pkg


def _policy(*packages: Path) -> Policy:
    return Policy(python=PythonPolicy(packages=packages))


@pytest.mark.parametrize("target", ["/etc", "../../outside", "/etc/passwd"])
def test_a_symlink_out_of_a_package_directory_is_refused(tmp_path: Path, target: str) -> None:
    pkg = _package_dir(tmp_path)
    (pkg / "good" / "leak").symlink_to(target)
    with pytest.raises(ConfigError, match="outside"):
        pk.describe(pkg)


def test_the_wasm_tier_refuses_an_escaping_symlink(tmp_path: Path) -> None:
    pkg = _package_dir(tmp_path)
    (pkg / "good" / "leak").symlink_to("/etc")
    with (Sandbox(_policy(pkg), tiers={TierName.WASM: lambda: WasmTier(tmp_path / "c")}) as sb,
          pytest.raises(ConfigError, match="outside")):
        sb.run(Task.python("import good\n", tier="wasm"))


def test_the_container_tier_refuses_an_escaping_symlink(
    container_ready: None, tmp_path: Path
) -> None:
    pkg = _package_dir(tmp_path)
    (pkg / "good" / "leak").symlink_to("/root")
    with (Sandbox(_policy(pkg), tiers={TierName.CONTAINER: ContainerTier}) as sb,
          pytest.raises(ConfigError, match="outside")):
        sb.run(Task.python("import good\n", tier="container"))


def test_symlinks_are_never_followed_while_scanning(tmp_path: Path) -> None:
    pkg = _package_dir(tmp_path)
    (pkg / "good" / "again").symlink_to(".")  # a loop, inside: fine, and never walked
    (pkg / "a").symlink_to("b")
    (pkg / "b").symlink_to("a")
    assert pk.describe(pkg).extensions == {"good": ()}


def test_a_deep_tree_is_refused_without_recursion(tmp_path: Path) -> None:
    pkg = _package_dir(tmp_path)
    deep = pkg / "good"
    for _ in range(pk.MAX_DEPTH + 2):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(ConfigError, match="directories deep"):
        pk.describe(pkg)


def test_a_huge_tree_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pk, "MAX_ENTRIES", 100)
    pkg = _package_dir(tmp_path)
    for n in range(150):
        (pkg / "good" / f"m{n}.py").write_text("")
    with pytest.raises(ConfigError, match="over 100 files"):
        pk.describe(pkg)


@pytest.mark.parametrize("member", ["../evil.py", "tiny/../../evil.py", "/tmp/evil.py",
                                    "..\\evil.py"])
def test_a_wheel_member_outside_the_wheel_is_refused(tmp_path: Path, member: str) -> None:
    wheel = tmp_path / "w" / "tiny-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/__init__.py", "X = 1\n")
        zf.writestr(member, "hacked = True\n")
    root = tmp_path / "w" / "cache" / "wheels"
    with pytest.raises(ConfigError, match="unsafe path"):
        pk.unpack_wheel(wheel, root)
    with pytest.raises(ConfigError, match="unsafe path"):
        pk.describe(wheel)
    assert not root.exists() or not any(root.iterdir())
    assert not (tmp_path / "w" / "evil.py").exists()


def test_the_wasm_tier_refuses_a_wheel_with_a_dotdot_member(tmp_path: Path) -> None:
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/__init__.py", "X = 1\n")
        zf.writestr("../evil.py", "hacked = True\n")
    with (Sandbox(_policy(wheel), tiers={TierName.WASM: lambda: WasmTier(tmp_path / "c")}) as sb,
          pytest.raises(ConfigError, match="unsafe path")):
        sb.run(Task.python("import tiny\n", tier="wasm"))


def test_a_wheel_declaring_too_much_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pk, "MAX_WHEEL_BYTES", 1000)
    wheel = tmp_path / "big-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big/__init__.py", "0" * 5000)  # compresses to a few bytes
    with pytest.raises(ConfigError, match="unpacks to over 1000 bytes"):
        pk.unpack_wheel(wheel, tmp_path / "wheels")
    assert not (tmp_path / "wheels").exists()


def test_an_unpacked_wheel_is_writable_by_no_one_else(tmp_path: Path) -> None:
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/__init__.py", "X = 1\n")
        zf.writestr("tiny/sub/m.py", "Y = 2\n")
    old = os.umask(0)  # a careless host umask must not leak into the cache
    try:
        target = pk.unpack_wheel(wheel, tmp_path / "wheels")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(target)): p.stat().st_mode & 0o777
             for p in [target, *target.rglob("*")]}
    assert modes == {".": 0o755, "tiny": 0o755, "tiny/__init__.py": 0o644,
                     "tiny/sub": 0o755, "tiny/sub/m.py": 0o644}
