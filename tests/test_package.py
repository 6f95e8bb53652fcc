"""The installed package is whole: a wheel, installed outside the repository, runs Python tasks.

The wheel is built from a copy of the package sources (``pip wheel --no-deps``), installed
with ``--no-deps`` into a fresh venv (``--system-site-packages``; the test venv's site-packages
is added by a ``.pth`` file so dependencies come from there, but not the editable checkout),
and driven from a working directory outside the repository. Nothing may be read from the
checkout: the Python runner the container tier stages must come from the package itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """\
import json, sys
import wasmbox
from wasmbox import Sandbox, Task
source = ("import dataclasses\\n@dataclasses.dataclass\\nclass P:\\n    x: int\\n"
          "def main(inp):\\n    return {'x': P(inp['x']).x, 'module': __name__}\\n")
with Sandbox() as sb:
    r = sb.run(Task.python(source, input={"x": 7}, tier=sys.argv[1]))
print(json.dumps({"wasmbox": wasmbox.__file__, "tier": r.tier.value, "status": r.status.value,
                  "output": r.output, "stderr": r.stderr[-1000:], "reason": r.reason}))
"""


class Installed:
    """A fresh venv holding only the wheel, and a working directory outside the repo."""

    def __init__(self, base: Path) -> None:
        src = base / "src"
        shutil.copytree(ROOT / "wasmbox", src / "wasmbox",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        wheels = base / "wheels"
        _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-q", "-w", str(wheels), str(src)], cwd=base)
        (self.wheel,) = wheels.glob("wasmbox-*.whl")
        venv = base / "venv"
        _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                str(venv)], cwd=base)
        self.python = venv / "bin" / "python"
        _check([sys.executable, "-m", "pip", "--python", str(self.python), "install",
                "--no-deps", "-q", str(self.wheel)], cwd=base)
        site = subprocess.run([str(self.python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # The test venv's dependencies, as a plain path: its .pth files (the editable
        # install of this checkout among them) are not processed.
        deps = sysconfig.get_paths()["purelib"]
        Path(site, "_wasmbox_test_deps.pth").write_text(deps + "\n")
        self.cwd = base / "elsewhere"
        self.cwd.mkdir()

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run([str(self.python), *argv], cwd=self.cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)


def _check(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, f"{argv[:4]} failed: {done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("package"))


def test_the_wheel_holds_the_runner(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "wasmbox/runner/runner.py" in names
    assert "wasmbox/tiers/wasm/python_app/app.py" in names


@pytest.mark.parametrize("tier", ["wasm", "container"])
def test_python_task_runs_from_the_installed_wheel(installed: Installed, tier: str) -> None:
    if tier == "container" and not (shutil.which("crun") or shutil.which("runc")):
        pytest.skip("neither crun nor runc is installed")
    done = installed.run("-c", PROBE, tier)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["wasmbox"]).is_relative_to(installed.python.parents[1])  # not the repo
    assert (report["tier"], report["status"]) == (tier, "completed"), report
    assert report["output"] == {"x": 7, "module": "__task__"}


def test_bench_says_it_needs_a_checkout(installed: Installed) -> None:
    done = installed.run("-m", "wasmbox", "bench")
    assert done.returncode == 3  # a host error (2 is a usage error)
    assert "needs a wasmbox source checkout" in done.stderr
