"""policy.python.packages across tiers: what the scan finds, the wasm tier's refusal of C
extensions (and auto's escalation), and the runner's --path convention."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task
from wasmbox import packages as pk
from wasmbox.errors import TierUnavailable
from wasmbox.models import PythonPolicy, TierName
from wasmbox.runner import PACKAGES_MOUNT, PATH_OPTION, package_args, runner_dir
from wasmbox.tiers.wasm import WasmTier

SO = "cpython-311-x86_64-linux-gnu.so"


@pytest.fixture(autouse=True)
def _fresh_scans() -> Iterator[None]:
    pk.clear_cache()
    yield
    pk.clear_cache()


def _site(root: Path) -> Path:
    """A ``pip install --target``-like directory: a compiled package, a pure one, a module."""
    site = root / "site"
    (site / "fast" / "core").mkdir(parents=True)
    (site / "fast" / "__init__.py").write_text("from fast.core import _speed\n")
    (site / "fast" / "core" / f"_speed.{SO}").write_bytes(b"\x7fELF")
    (site / "fast.libs").mkdir()
    (site / "fast.libs" / "libblas-1234.so.3").write_bytes(b"\x7fELF")
    (site / "fast-1.0.dist-info").mkdir()
    (site / "pure").mkdir()
    (site / "pure" / "__init__.py").write_text("VALUE = 41\n")
    (site / "helper.py").write_text("def twice(x):\n    return 2 * x\n")
    (site / f"_cmod.{SO}").write_bytes(b"\x7fELF")
    return site


def _policy(*packages: Path, **kw: object) -> Policy:
    return Policy(python=PythonPolicy(packages=packages), **kw)  # type: ignore[arg-type]


def test_the_scan_finds_c_extensions_per_top_level_name(tmp_path: Path) -> None:
    found = pk.describe(_site(tmp_path)).extensions
    assert found == {"fast": (f"fast/core/_speed.{SO}",), "pure": (), "helper": (),
                     "_cmod": (f"_cmod.{SO}",)}


def test_a_package_directory_listed_itself_is_one_name(tmp_path: Path) -> None:
    found = pk.describe(_site(tmp_path) / "fast").extensions
    assert found == {"fast": (f"core/_speed.{SO}",)}


def test_a_wheel_is_described_from_its_members(tmp_path: Path) -> None:
    wheel = tmp_path / "fast-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"fast/_speed.{SO}", b"\x7fELF")
        zf.writestr("fast/__init__.py", "")
        zf.writestr("fastpure.py", "")
        zf.writestr("fast-1.0.dist-info/RECORD", "")
    assert pk.describe(wheel).extensions == {"fast": (f"fast/_speed.{SO}",), "fastpure": ()}


def test_the_scan_cache_sees_a_reinstall(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert pk.describe(site).extensions["pure"] == ()
    shutil.rmtree(site / "pure")  # what pip install --upgrade does: a new directory
    (site / "pure").mkdir()
    (site / "pure" / f"_now_compiled.{SO}").write_bytes(b"\x7fELF")
    assert pk.describe(site).extensions["pure"] == (f"pure/_now_compiled.{SO}",)


def test_wasm_refuses_an_imported_c_extension_package_naming_the_tier(tmp_path: Path) -> None:
    tiers = {TierName.WASM: lambda: WasmTier(tmp_path / "cache")}
    with (Sandbox(_policy(_site(tmp_path)), tiers=tiers) as sb,  # type: ignore[arg-type]
          pytest.raises(TierUnavailable, match=r"fast .* has C extensions .*tier='container'")):
        sb.run(Task.python("import fast\n", tier="wasm"))


def test_auto_limited_to_wasm_explains_the_c_extension(tmp_path: Path) -> None:
    policy = _policy(_site(tmp_path), allowed_tiers=frozenset({TierName.WASM}))
    tiers = {TierName.WASM: lambda: WasmTier(tmp_path / "cache")}
    with (Sandbox(policy, tiers=tiers) as sb,  # type: ignore[arg-type]
          pytest.raises(TierUnavailable, match=r"_cmod .* has C extensions") as caught):
        sb.run(Task.python("import json\ndef f():\n    import _cmod\n"))
    assert caught.value.declined_by_policy  # auto passed wasm over; the policy barred the rest
    assert "allowed_tiers" in str(caught.value)


def test_the_first_listed_entry_decides(tmp_path: Path) -> None:
    """A pure ``fast`` listed before the compiled one is the one imported: not refused."""
    first = tmp_path / "first"
    (first / "fast").mkdir(parents=True)
    (first / "fast" / "__init__.py").write_text("")
    site = _site(tmp_path)
    assert pk.wasm_refusal((first, site), frozenset({"fast"})) is None
    assert pk.wasm_refusal((site, first), frozenset({"fast"})) is not None


def test_pure_packages_beside_compiled_ones_run_in_wasm(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    sb = make_py_sandbox(_policy(_site(tmp_path)))
    r = sb.run(Task.python("import pure, helper\ndef main(inp):\n"
                           "    return helper.twice(pure.VALUE)\n"))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr)
    assert (r.tier, r.output) == (TierName.WASM, 82)


def _run_runner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    task = tmp_path / "task.py"
    task.write_text("import sys\nprint('\\n'.join(sys.path))\n")
    return subprocess.run([sys.executable, "-I", "-B", str(runner_dir() / "runner.py"), *args,
                           str(task)], capture_output=True, text=True, timeout=60)


def test_the_runner_puts_package_paths_after_the_stdlib_before_site_packages(
    tmp_path: Path
) -> None:
    out = _run_runner(tmp_path, *package_args(2))
    assert out.returncode == 0, out.stderr
    path = out.stdout.splitlines()
    a, b = path.index(f"{PACKAGES_MOUNT}/0"), path.index(f"{PACKAGES_MOUNT}/1")
    stdlib = path.index(str(Path(shutil.__file__).parent))
    site = [i for i, p in enumerate(path) if p.endswith(("site-packages", "dist-packages"))]
    assert stdlib < a < b and all(a < i for i in site)


def test_the_runner_rejects_a_dangling_path_option(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-I", str(runner_dir() / "runner.py"), PATH_OPTION],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 64 and "usage" in out.stderr


def test_the_cpython_tag_check_accepts_matching_and_untagged_extensions(tmp_path: Path) -> None:
    site = _site(tmp_path)  # fast: cpython-311; _cmod: cpython-311
    (site / "stable").mkdir()
    (site / "stable" / "_x.abi3.so").write_bytes(b"\x7fELF")
    names = frozenset({"fast", "stable", "pure", "_cmod"})
    assert pk.describe(site).cpython == {"fast": frozenset({"311"}), "_cmod": frozenset({"311"})}
    assert pk.abi_refusal((site,), names, "311") is None
    assert pk.abi_refusal((site,), frozenset({"stable", "pure"}), "312") is None
    refused = pk.abi_refusal((site,), names, "312")
    assert refused is not None and refused.startswith("_cmod ") and "CPython 3.11" in refused
