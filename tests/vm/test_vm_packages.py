"""``policy.python.packages`` in the VM: each directory is shared read-only at
``/opt/wasmbox/packages/<n>`` and importable, by Python tasks (the runner's ``sys.path``) and
by ``python3`` commands (``PYTHONPATH``), C extensions built for the host's python3 included."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.container.test_packages import NUMPY_TASK, numpy_dir
from wasmbox import Policy, Sandbox, Task
from wasmbox.errors import TierUnavailable
from wasmbox.models import PythonPolicy, Status, TierName
from wasmbox.policy import apply
from wasmbox.tiers.vm.assets import AssetReport
from wasmbox.tiers.vm.tier import VmTier

pytestmark = pytest.mark.vm
__all__ = ["numpy_dir"]  # the container tests' cached `pip install --target numpy` fixture

C_EXTENSION = r"""
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "wbxcext", NULL, -1, methods};
PyMODINIT_FUNC PyInit_wbxcext(void) { return PyModule_Create(&module); }
"""


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two package dirs: a pure-Python package, and a C extension for the host's python3."""
    pure = tmp_path_factory.mktemp("pure")
    (pure / "wbxpure").mkdir()
    (pure / "wbxpure" / "__init__.py").write_text("VALUE = 'pure'\n")
    native = tmp_path_factory.mktemp("native")
    host = subprocess.run(["/usr/bin/python3", "-c", "import sysconfig; print("
                           "sysconfig.get_paths()['include'], sysconfig.get_config_var("
                           "'EXT_SUFFIX'))"], capture_output=True, text=True, check=True)
    include, suffix = host.stdout.split()
    if not Path(include, "Python.h").exists():
        pytest.skip("the host's python3 headers are not installed (python3-dev)")
    (native / "wbxcext.c").write_text(C_EXTENSION)
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{include}", "-o",
                    str(native / f"wbxcext{suffix}"), str(native / "wbxcext.c")], check=True)
    for top in (pure, native):
        top.chmod(0o755)  # as `pip install --target` leaves it; pytest's own dirs are 0700
    return pure, native


@pytest.fixture(scope="module")
def package_sandbox(vm_assets: AssetReport, packages: tuple[Path, Path]) -> Iterator[Sandbox]:
    policy = Policy(python=PythonPolicy(packages=packages))
    with Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0, boot_timeout=60)}) as sb:
        yield sb


def test_a_python3_command_imports_the_packages(package_sandbox: Sandbox) -> None:
    script = ("import wbxpure, wbxcext, sys; "
              "print(wbxpure.VALUE, wbxcext.answer(), wbxcext.__file__, sys.path[1])")
    result = package_sandbox.run(Task.command(["python3", "-c", script], tier="vm"))
    assert result.status is Status.COMPLETED, result
    value, answer, where, first = result.stdout.split()
    assert (value, answer) == ("pure", "42")
    assert where.startswith("/opt/wasmbox/packages/1/")
    assert first == "/opt/wasmbox/packages/0"


def test_a_python_task_imports_the_packages(package_sandbox: Sandbox) -> None:
    source = ("import wbxpure, wbxcext\n"
              "def main(input):\n    return [wbxpure.VALUE, wbxcext.answer()]\n")
    result = package_sandbox.run(Task.python(source, tier="vm"))
    assert result.status is Status.COMPLETED, result
    assert result.output == ["pure", 42]


def test_packages_are_read_only(package_sandbox: Sandbox, packages: tuple[Path, Path]) -> None:
    # World-writable on the host: only the read-only share and mount stop the task.
    packages[0].chmod(0o777)
    script = ("touch /opt/wasmbox/packages/0/x 2>/dev/null && echo WROTE; "
              "while read -r _ _ _ _ point opts _; do "
              "[ \"$point\" = /opt/wasmbox/packages/0 ] && echo $opts; "
              "done < /proc/self/mountinfo; "
              "ls /opt/wasmbox/packages")
    result = package_sandbox.run(Task.command(["sh", "-c", script], tier="vm"))
    assert result.status is Status.COMPLETED, result
    options, *listing = result.stdout.split()
    assert {"ro", "nosuid", "nodev"} <= set(options.split(","))
    assert listing == ["0", "1"]
    assert not (packages[0] / "x").exists()


def test_a_directory_the_task_user_cannot_read_is_unsuitable(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    plan = apply(Policy(python=PythonPolicy(packages=(private,))),
                 Task.command(["true"], tier="vm"))
    tier = VmTier(pool_size=0)
    try:
        with pytest.raises(TierUnavailable, match="chmod o\\+rx"):
            tier.prepare(plan)  # declined before any asset or guest is touched
    finally:
        tier.close()


def test_a_wheel_is_unsuitable_with_the_reason(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    plan = apply(Policy(python=PythonPolicy(packages=(wheel,))),
                 Task.command(["true"], tier="vm"))
    tier = VmTier(pool_size=0)
    try:
        with pytest.raises(TierUnavailable, match="pip install --target"):
            tier.prepare(plan)
    finally:
        tier.close()


def test_numpy_from_pip_install_target_runs_in_the_vm(vm_assets: AssetReport,
                                                       numpy_dir: Path) -> None:
    """The README's workflow on the VM tier: a wheel with C extensions (and libstdc++ beside
    python3's own libraries) from `pip install --target`."""
    policy = Policy(python=PythonPolicy(packages=(numpy_dir,)))
    with Sandbox(policy, tiers={TierName.VM: lambda: VmTier(pool_size=0, boot_timeout=60)}) as sb:
        r = sb.run(Task.python(NUMPY_TASK, tier="vm"))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr[-2000:])
    assert r.output == {"sum": 66.0, "det": 8.0,
                        "file": "/opt/wasmbox/packages/0/numpy/__init__.py"}
