"""Python tasks in the wasm tier: results, errors, imports, packages, isolation between runs."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmbox import Policy, Result, Sandbox, Status, Task
from wasmbox.models import PythonPolicy, TierName


def run(sb: Sandbox, source: str, **fields: object) -> Result:
    return sb.run(Task.python(source, tier=TierName.WASM, **fields))


def test_main_return_value_is_the_output(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp):\n    return {'sum': sum(inp['xs'])}\n",
            input={"xs": [1, 2, 3]})
    assert r.status is Status.COMPLETED
    assert r.output == {"sum": 6}
    assert r.exit_code == 0


def test_custom_entry_is_called(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def go(inp):\n    return inp * 2\n", input=21, entry="go")
    assert r.output == 42


def test_script_without_main_runs_as_dunder_main(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "print('hello from', __name__)\n")
    assert r.status is Status.COMPLETED
    assert r.stdout == "hello from __main__\n"
    assert r.output is None


def test_script_may_write_its_own_result_file(py_sandbox: Sandbox) -> None:
    source = (
        "import json\n"
        "inp = json.load(open('/task/input.json'))\n"
        "with open('/task/output/result.json', 'w') as f:\n"
        "    json.dump({'got': inp}, f)\n"
    )
    r = run(py_sandbox, source, input=[1, 2])
    assert r.output == {"got": [1, 2]}


def test_uncaught_exception_is_failed_with_traceback(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp):\n    raise ValueError('boom')\n")
    assert r.status is Status.FAILED
    assert r.exit_code == 1
    assert r.reason == "ValueError: boom"
    assert "Traceback (most recent call last)" in r.stderr
    assert 'File "<task>", line 2, in main' in r.stderr


def test_syntax_error_is_failed(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp)\n    return 1\n")
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith("SyntaxError")


def test_non_json_return_value_fails_with_exit_code_2(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp):\n    return {1, 2}\n")
    assert r.status is Status.FAILED
    assert r.exit_code == 2
    assert "not JSON" in r.stderr
    assert r.output is None


def test_nan_is_not_json(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "def main(inp):\n    return float('nan')\n")
    assert r.exit_code == 2


def test_sys_exit_code_is_the_exit_code(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import sys\nsys.exit(3)\n")
    assert r.status is Status.FAILED
    assert r.exit_code == 3


def test_sys_exit_zero_completes(py_sandbox: Sandbox) -> None:
    assert run(py_sandbox, "import sys\nprint('x')\nsys.exit()\n").status is Status.COMPLETED


def test_preloaded_stdlib_is_importable(py_sandbox: Sandbox) -> None:
    source = (
        "import json, re, math, hashlib, datetime, decimal, collections, itertools\n"
        "import dataclasses, functools, statistics, string, textwrap, random, typing\n"
        "import fractions, heapq, bisect, operator, copy, enum\n"
        "def main(inp):\n"
        "    return [hashlib.sha256(b'x').hexdigest()[:8], str(decimal.Decimal('1.10') * 3),\n"
        "            statistics.mean([1, 2, 3]), str(fractions.Fraction(1, 3) * 3)]\n"
    )
    r = run(py_sandbox, source)
    assert r.output == ["2d711642", "3.30", 2, "1"]


def test_unknown_module_fails_with_clear_import_error(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import numpy\n")
    assert r.status is Status.FAILED
    assert r.reason is not None
    assert r.reason.startswith("ModuleNotFoundError: No module named 'numpy'")
    assert "container tier" in r.reason


def test_each_task_gets_a_fresh_interpreter(py_sandbox: Sandbox) -> None:
    run(py_sandbox, "import sys\nsys.leftover = 1\nimport json\njson.sentinel = 2\n")
    r = run(py_sandbox, "import sys, json\n"
            "def main(inp):\n    return [hasattr(sys, 'leftover'), hasattr(json, 'sentinel')]\n")
    assert r.output == [False, False]


def test_stdout_and_stderr_are_captured(py_sandbox: Sandbox) -> None:
    r = run(py_sandbox, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")


def _policy(*packages: Path) -> Policy:
    return Policy(python=PythonPolicy(packages=packages))


def test_policy_package_directory_is_importable(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    pkg = tmp_path / "greet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from greet.words import WORD\n")
    (pkg / "words.py").write_text("WORD = 'hi'\n")
    r = run(make_py_sandbox(_policy(pkg)), "import greet\ndef main(inp):\n    return greet.WORD\n")
    assert r.output == "hi"


def test_policy_path_directory_is_on_sys_path(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    (tmp_path / "helper.py").write_text("def twice(x):\n    return 2 * x\n")
    r = run(make_py_sandbox(_policy(tmp_path)), "import helper\ndef main(inp):\n"
            "    return helper.twice(4)\n")
    assert r.output == 8


def test_policy_wheel_is_importable(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/__init__.py", "VALUE = 7\n")
        zf.writestr("tiny-1.0.dist-info/METADATA", "Name: tiny\nVersion: 1.0\n")
    r = run(make_py_sandbox(_policy(wheel)), "import tiny\ndef main(inp):\n"
            "    return tiny.VALUE\n")
    assert r.output == 7


def test_policy_packages_are_read_only(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    (tmp_path / "helper.py").write_text("X = 1\n")
    source = "import helper\nopen(helper.__file__, 'w').write('X = 2\\n')\n"
    r = run(make_py_sandbox(_policy(tmp_path)), source)
    assert r.status is Status.FAILED
    assert (tmp_path / "helper.py").read_text() == "X = 1\n"


def test_wheel_with_c_extension_is_refused(
    tmp_path: Path, make_py_sandbox: Callable[[Policy], Sandbox]
) -> None:
    wheel = tmp_path / "fast-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fast/_speedups.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
    from wasmbox import TierUnavailable

    with pytest.raises(TierUnavailable, match=r"C extensions.*tier='container'"):
        run(make_py_sandbox(_policy(wheel)), "import fast\n")
