"""Internal: building and caching the Python interpreter component (wasm tier).

The interpreter is built once by componentize-py from ``python_app/`` and the shared runner,
its clock bounded by `clock_shim`, compiled once per engine flavour; both artefacts are cached
on disk under `app_key`, and processes sharing a cache build it only once (an flock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import wasmtime
from wasmtime import component

from wasmbox._fs import atomic_path, write_atomic
from wasmbox.errors import HostFailure
from wasmbox.runner import RUNNER_NAME, runner_dir, runner_source
from wasmbox.tiers.wasm import clock_shim, python_app

COMPONENTIZE_PY = "0.25.1"
APP_DIR = Path(python_app.__file__).parent
BUILD_TIMEOUT = 300.0
_BUILD_SCRIPT = (
    "import sys, componentize_py; sys.argv = ['componentize-py', *sys.argv[1:]]; "
    "sys.exit(componentize_py.script())"
)


def app_key() -> str:
    """Names the component: componentize-py version, a hash of every guest-side source, and
    the clock shim composed into it."""
    digest = hashlib.sha256(f"componentize-py {COMPONENTIZE_PY}\n".encode())
    digest.update(clock_shim.shim_key().encode())
    for path in sorted(APP_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(RUNNER_NAME.encode() + b"\0" + runner_source() + b"\0")  # built in too
    return f"python-{COMPONENTIZE_PY}-{digest.hexdigest()[:16]}"


def build_component(out: Path) -> None:
    """Build the interpreter component into `out` (atomically); raises `HostFailure`.

    componentize-py builds it; `clock_shim.compose` then bounds its clock by the deadline.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        wit = Path(tmp) / "world.wit"
        wit.write_text(python_app.WORLD, encoding="utf-8")
        target = Path(tmp) / "python.wasm"
        argv = [sys.executable, "-c", _BUILD_SCRIPT, "-q", "-d", str(wit),
                "-w", python_app.WORLD_NAME, "componentize", "-p", str(APP_DIR),
                "-p", str(runner_dir()), "app",
                "-o", str(target)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                  cwd=tmp, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostFailure(f"componentize-py could not build the interpreter: {exc}") from exc
        if done.returncode != 0 or not target.exists():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise HostFailure(f"componentize-py failed ({done.returncode}): {tail}")
        with atomic_path(out) as composed:
            clock_shim.compose(target, composed)


def compiled_component(engine: wasmtime.Engine, directory: Path, flavour_key: str
                       ) -> component.Component:
    """The interpreter compiled for `engine`, from the cache in `directory` when it is there
    (building and compiling it otherwise, once across processes); raises `HostFailure`."""
    key = app_key()
    source = directory / f"{key}.wasm"
    compiled = directory / f"{key}-{flavour_key}.cwasm"
    try:
        comp = _deserialize(engine, compiled)
        if comp is None:
            with file_lock(directory / f"{key}.lock"):
                comp = _deserialize(engine, compiled)
                if comp is None:
                    if not source.exists():
                        build_component(source)
                    comp = component.Component.from_file(engine, str(source))
                    write_atomic(compiled, comp.serialize())
    except wasmtime.WasmtimeError as exc:
        raise HostFailure(f"the Python interpreter cannot be compiled: {exc}") from exc
    return comp


def _deserialize(engine: wasmtime.Engine, path: Path) -> component.Component | None:
    if not path.exists():
        return None
    try:
        return component.Component.deserialize_file(engine, str(path))
    except wasmtime.WasmtimeError:
        path.unlink(missing_ok=True)  # stale or corrupt: compile again
        return None


class file_lock:
    """An exclusive flock, so processes sharing a cache build the interpreter only once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing drops the lock
