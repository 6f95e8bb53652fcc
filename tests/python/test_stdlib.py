"""The whole standard library in the wasm tier: the hot set is snapshotted, the rest of the
interpreter's own stdlib is mounted read-only at ``/python`` and imported on demand.

The module list is generated from the mounted stdlib itself; what cannot import is named,
with the reason, in `CANNOT_EXIST` (C modules CPython-for-WASI does not build, and what the
guest refuses: sockets, subprocesses, ctypes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmbox import Policy, Sandbox, Status, Task, TierName, apply
from wasmbox.models import Limits, TimeoutPolicy
from wasmbox.tiers.wasm import WasmTier
from wasmbox.tiers.wasm.python import REFUSED_STDLIB, STDLIB_KEY, PythonRuntime

# Not library modules (GUI, demos, a module that prints or opens a browser on import).
NOT_LIBRARY = frozenset({"idlelib", "tkinter", "turtledemo", "turtle", "antigravity", "this",
                         "__hello__", "__phello__", "site-packages"})
# Why a module cannot import here, keyed by the missing module its ImportError names.
CANNOT_EXIST = {
    "socket": "refused by the guest: no sockets in the wasm tier",
    "select": "refused by the guest: no sockets in the wasm tier",
    "selectors": "refused by the guest: no sockets in the wasm tier",
    "ssl": "refused by the guest: no sockets in the wasm tier",
    "subprocess": "refused by the guest: WASI cannot spawn processes",
    "multiprocessing": "refused by the guest: WASI cannot spawn processes",
    "ctypes": "refused by the guest: no native code in the wasm tier",
    "_bz2": "C module not built for WASI",
    "_lzma": "C module not built for WASI",
    "_zstd": "C module not built for WASI",
    "_curses": "C module not built for WASI",
    "_gdbm": "C module not built for WASI",
    "_dbm": "C module not built for WASI",
    "termios": "C module not built for WASI",
    "_interpreters": "C module not built for WASI (no subinterpreters)",
}
# Modules failing for their own reason.
OWN_REASON = {
    "encodings.mbcs": "Windows-only codec",
    "encodings.oem": "Windows-only codec",
    "unittest.__main__": "a script: runs test discovery on import",
}
IMPORT_ALL = """
import importlib
def main(names):
    bad = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            bad[name] = exc.name or str(exc)
    return bad
"""
EVERYDAY = """
import argparse, logging, pathlib, tomllib, email, gzip, html, secrets, shlex, glob, io
import tempfile, zoneinfo, urllib.parse, xml.etree.ElementTree as ET
def main(inp):
    log = io.StringIO()
    logging.basicConfig(stream=log, level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("t").info("hello %s", inp["who"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int)
    args = parser.parse_args(["--n", "3"])
    conf = tomllib.loads('[a]\\nx = 1\\n')
    out = pathlib.Path("/task/output/note.txt")
    out.write_text("hi")
    return {"log": log.getvalue().strip(), "n": args.n, "toml": conf,
            "read": out.read_text(),
            "task": sorted(p.name for p in pathlib.Path("/task").iterdir()),
            "q": urllib.parse.urlencode({"a": "b c"}), "html": html.escape("<"),
            "xml": ET.fromstring("<r><c/></r>")[0].tag,
            "gz": gzip.decompress(gzip.compress(b"x")).decode(), "split": shlex.split("a 'b c'")}
"""


def stdlib_names(root: Path) -> list[str]:
    """Every importable module name of the unpacked stdlib, submodules included."""
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and parts[0] not in NOT_LIBRARY and all(p.isidentifier() for p in parts):
            names.append(".".join(parts))
    return names


@pytest.fixture(scope="module")
def big_sandbox(python_cache: Path) -> Iterator[Sandbox]:
    policy = Policy(limits=Limits(fuel=400_000_000_000, memory="1GiB"),
                    timeouts=TimeoutPolicy(run=120))
    with Sandbox(policy, tiers={TierName.WASM: lambda: WasmTier(python_cache)}) as sb:
        yield sb


def test_every_stdlib_module_imports_but_the_listed_few(
    big_sandbox: Sandbox, python_cache: Path
) -> None:
    names = stdlib_names(python_cache / STDLIB_KEY)
    assert len(names) > 500 and "pathlib" in names and "email.mime.text" in names
    r = big_sandbox.run(Task.python(IMPORT_ALL, input=names, tier=TierName.WASM))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr[-2000:])
    failed: dict[str, str] = r.output
    unexplained = {n: why for n, why in failed.items()
                   if n not in OWN_REASON and why not in CANNOT_EXIST}
    assert unexplained == {}
    # tier=auto must know: every top-level module that fails is one it sends elsewhere.
    assert {n for n in failed if "." not in n} <= REFUSED_STDLIB
    importable = len(names) - len(failed)
    assert importable > 400, failed
    for name in ("pathlib", "logging", "urllib.parse", "html", "xml.etree.ElementTree", "gzip",
                 "secrets", "shlex", "glob", "tempfile", "zoneinfo", "tomllib", "email",
                 "argparse", "sqlite3"):
        assert name not in failed


def test_everyday_stdlib_really_works(py_sandbox: Sandbox) -> None:
    r = py_sandbox.run(Task.python(EVERYDAY, input={"who": "w"}, tier=TierName.WASM))
    assert r.status is Status.COMPLETED, (r.reason, r.stderr[-2000:])
    out = r.output
    assert out["log"] == "INFO hello w"
    assert (out["n"], out["toml"], out["read"]) == (3, {"a": {"x": 1}}, "hi")
    assert "input.json" in out["task"]
    assert (out["q"], out["html"], out["xml"], out["gz"]) == ("a=b+c", "&lt;", "c", "x")
    assert out["split"] == ["a", "b c"]


def test_the_stdlib_mount_is_read_only(py_sandbox: Sandbox) -> None:
    r = py_sandbox.run(Task.python(
        "import pathlib\nopen(pathlib.__file__, 'a').write('x = 1\\n')\n", tier=TierName.WASM))
    assert r.status is Status.FAILED
    assert r.reason is not None and r.reason.startswith(("PermissionError", "OSError"))


def test_auto_keeps_a_pathlib_task_in_wasm(python_cache: Path) -> None:
    with WasmTier(python_cache) as tier:
        runtime = PythonRuntime(python_cache, lambda flavour: tier._engine_for(flavour)[0])
        try:
            for source in ("import pathlib\n", "import logging, email.mime.text, tomllib\n"):
                plan = apply(Policy(), Task.python(source))
                assert runtime.unsuitable(plan) is None
            lacking = runtime.unsuitable(apply(Policy(), Task.python("import lzma\n")))
            assert lacking is not None and "lzma" in lacking
        finally:
            runtime.close()
