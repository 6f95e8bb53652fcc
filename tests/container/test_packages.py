"""policy.python.packages in the container tier: C extensions (numpy) load, read-only, auto.

numpy is installed once with ``pip install --target`` into ``build/packages/`` (kept between
runs) for the container's ``python3``; the tests skip only when PyPI cannot be reached.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Task
from wasmbox import packages as pk
from wasmbox.errors import ConfigError
from wasmbox.models import PythonPolicy, Status, TierName
from wasmbox.runner import PACKAGES_MOUNT
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.wasm import WasmTier

ROOT = Path(__file__).resolve().parents[2]
GUEST_PYTHON = "/usr/bin/python3"  # what the container runs (the host's, bound read-only)
NUMPY_TASK = """
import numpy as np
def main(inp):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    return {"sum": float(a.sum()), "det": round(float(np.linalg.det(np.eye(3) * 2)), 6),
            "file": np.__file__}
"""


def _guest_version() -> str:
    out = subprocess.run([GUEST_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def _pip() -> list[str]:
    """pip for the guest's python3: its own if it has one, else ours, told the target."""
    if subprocess.run([GUEST_PYTHON, "-m", "pip", "--version"], capture_output=True,
                      timeout=30).returncode == 0:
        return [GUEST_PYTHON, "-m", "pip"]
    return [sys.executable, "-m", "pip", "--python-version", _guest_version(),
            "--only-binary=:all:", "--platform", "manylinux2014_x86_64"]


@pytest.fixture(scope="session")
def numpy_dir() -> Path:
    """A ``pip install --target`` directory holding numpy for the guest's python3, cached
    under build/packages/ (installed once; a finished install has a marker file)."""
    if not os.path.exists(GUEST_PYTHON):
        pytest.skip(f"{GUEST_PYTHON} is missing: the container tier has no python3")
    target = ROOT / "build" / "packages" / f"numpy-py{_guest_version()}"
    if (target / ".complete").exists():
        return target
    try:
        urllib.request.urlopen("https://pypi.org/simple/numpy/", timeout=15).close()
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"the PyPI index is unreachable, cannot install numpy: {exc}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".numpy-", dir=target.parent))
    try:
        subprocess.run([*_pip(), "install", "--quiet", "--disable-pip-version-check",
                        "--no-warn-script-location", "--target", str(tmp), "numpy"],
                       check=True, timeout=600,
                       env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
        tmp.chmod(0o755)  # mkdtemp made it 0700; the guest (uid 65534) must enter it
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _policy(*packages: Path, tiers: frozenset[TierName] | None = None) -> Policy:
    if tiers is None:
        return Policy(python=PythonPolicy(packages=packages))
    return Policy(python=PythonPolicy(packages=packages), allowed_tiers=tiers)


@pytest.fixture
def numpy_sandbox(container_ready: None, numpy_dir: Path) -> Iterator[Sandbox]:
    with Sandbox(_policy(numpy_dir), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        yield sb


def test_numpy_task_runs_in_the_container_tier(numpy_sandbox: Sandbox) -> None:
    r = numpy_sandbox.run(Task.python(NUMPY_TASK, tier="container"))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert r.output == {"sum": 66.0, "det": 8.0, "file": f"{PACKAGES_MOUNT}/0/numpy/__init__.py"}


def test_auto_sends_a_numpy_task_to_the_container_tier(
    container_ready: None, numpy_dir: Path, tmp_path: Path
) -> None:
    tiers = {TierName.WASM: lambda: WasmTier(tmp_path), TierName.CONTAINER: ContainerTier}
    with Sandbox(_policy(numpy_dir), tiers=tiers) as sb:  # type: ignore[dict-item]
        r = sb.run(Task.python(NUMPY_TASK))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert (r.tier, r.escalated_from) == (TierName.CONTAINER, TierName.WASM)
    assert r.escalation_reason is not None
    assert "numpy" in r.escalation_reason and "C extensions" in r.escalation_reason


def test_the_package_mount_is_read_only(container_ready: None, tmp_path: Path) -> None:
    """Even a package directory the guest's uid could write on the host (mode 0777) is
    read-only in the sandbox: only the mount stops these writes."""
    site = tmp_path / "site"
    (site / "victim").mkdir(parents=True)
    (site / "victim" / "__init__.py").write_text("SAFE = True\n")
    for path in (site, site / "victim", site / "victim" / "__init__.py"):
        path.chmod(0o777)
    source = f"""
import os, victim
def main(inp):
    tried = []
    for path in (victim.__file__, "{PACKAGES_MOUNT}/0/planted.py",
                 "{PACKAGES_MOUNT}/0/victim/x.py"):
        try:
            with open(path, "a") as f:
                f.write("hacked = True\\n")
            tried.append("written")
        except OSError as exc:
            tried.append(exc.errno)
    for act in (lambda: os.chmod(victim.__file__, 0o700), lambda: os.remove(victim.__file__),
                lambda: os.mkdir("{PACKAGES_MOUNT}/0/new")):
        try:
            act()
            tried.append("changed")
        except OSError as exc:
            tried.append(exc.errno)
    return tried
"""
    with Sandbox(_policy(site), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.python(source, tier="container"))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert r.output == [errno.EROFS] * 6
    assert (site / "victim" / "__init__.py").read_text() == "SAFE = True\n"
    assert sorted(p.name for p in site.rglob("*")) == ["__init__.py", "victim"]
    assert (site / "victim" / "__init__.py").stat().st_mode & 0o777 == 0o777


def test_pure_packages_directory_and_wheel_in_order(
    container_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASMBOX_CACHE_DIR", str(tmp_path / "cache"))  # where wheels unpack
    first, second = tmp_path / "first", tmp_path / "second"
    for d, word in ((first, "first"), (second, "second")):
        d.mkdir()
        d.chmod(0o755)
        (d / "which.py").write_text(f"WORD = {word!r}\n")
    (second / "only_second.py").write_text("X = 2\n")
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/__init__.py", "VALUE = 7\n")
        zf.writestr("tiny-1.0.dist-info/METADATA", "Name: tiny\nVersion: 1.0\n")
    source = ("import which, only_second, tiny, sys\n"
              "def main(inp):\n"
              "    return [which.WORD, only_second.X, tiny.VALUE,\n"
              "            [p for p in sys.path if p.startswith('/opt/')]]\n")
    with Sandbox(_policy(first, second, wheel),
                 tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.python(source, tier="container"))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert r.output == ["first", 2, 7, [f"{PACKAGES_MOUNT}/{n}" for n in range(3)]]


def test_a_command_task_sees_no_package_mount(container_ready: None, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "helper.py").write_text("X = 1\n")
    with Sandbox(_policy(tmp_path), tiers={TierName.CONTAINER: ContainerTier}) as sb:
        r = sb.run(Task.command(["/bin/ls", PACKAGES_MOUNT], tier="container"))
    assert r.status is Status.FAILED, r.stdout


def test_a_missing_package_directory_is_a_config_error(
    container_ready: None, tmp_path: Path
) -> None:
    with (Sandbox(_policy(tmp_path / "nope"), tiers={TierName.CONTAINER: ContainerTier}) as sb,
          pytest.raises(ConfigError, match=r"not a directory or a \.whl")):
        sb.run(Task.python("pass", tier="container"))


def test_pooled_containers_carry_the_package_mounts(
    container_ready: None, numpy_dir: Path
) -> None:
    with Sandbox(_policy(numpy_dir),
                 tiers={TierName.CONTAINER: lambda: ContainerTier(pool_size=1)}) as sb:
        results = [sb.run(Task.python(NUMPY_TASK, tier="container")) for _ in range(2)]
    for r in results:
        assert r.status is Status.COMPLETED, (r.reason, r.stderr)
        assert r.output["sum"] == 66.0


def test_a_package_built_for_another_cpython_is_a_config_error(
    container_ready: None, tmp_path: Path
) -> None:
    guest = pk.guest_cpython()
    if guest is None:
        pytest.skip(f"cannot tell the CPython version of {GUEST_PYTHON}")
    other = "399" if guest != "399" else "398"
    site = tmp_path / "site"
    (site / "fast").mkdir(parents=True)
    (site / "fast" / "__init__.py").write_text("from fast._speed import go\n")
    (site / "fast" / f"_speed.cpython-{other}-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    site.chmod(0o755)
    with (Sandbox(_policy(site), tiers={TierName.CONTAINER: ContainerTier}) as sb,
          pytest.raises(ConfigError, match=rf"built for CPython {other[0]}\.{other[1:]}, but "
                                           rf"the sandbox's python3 is {guest[0]}\.{guest[1:]}")):
        sb.run(Task.python("import fast\n", tier="container"))
