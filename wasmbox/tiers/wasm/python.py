"""Python tasks in the wasm tier: CPython compiled to WASI, pre-initialised, one instance a task.

The interpreter is a WebAssembly component built by the pinned PyPI package componentize-py
from ``python_app/`` and ``wasmbox/runner/`` (the guest side; see their docstrings). It is
built once (~5-8 s), compiled once, and both artefacts are cached on disk, keyed by the
componentize-py version, a hash of the guest sources, the wasmtime version and the engine
flags. Per task there is a fresh Store under the plan's fuel, epoch deadline, memory cap and
preopens (exactly ``/task`` read-only and ``/task/output`` writable, plus the policy's
mounts), a fresh instance of the snapshot, and one call
``run(source, filename, entry, input, paths)``: no task state survives.

What a task can import: the standard library modules pre-loaded in the snapshot (json, re,
math, hashlib, datetime, dataclasses, pathlib, logging, argparse, tomllib, ...: already
initialised), the rest of the interpreter's own standard library (`unpack_stdlib`, mounted
read-only at ``/python`` and imported on demand; `REFUSED_STDLIB` lists what cannot import and
why), and the pure-Python packages listed in ``policy.python.packages``, mounted read-only under
``/python/N``. Anything else fails with a ModuleNotFoundError that says so. **C extensions are
not supported in this tier** (a wheel with compiled code cannot load in WASI): run such tasks
in the container tier.

Blocking calls (issue 11, class 5): the epoch deadline only stops wasm code, and a task
blocked in ``wasi:io/poll`` (``time.sleep``'s original, reachable through
``time.sleep.__globals__``, or ``select.select``) used to hold its host thread for the whole
wait. The core-module tier shadows ``poll_oneoff``; here that is not possible with
wasmtime-py 50:

* the component Linker can shadow an import only by redefining its whole instance, and a
  Python function cannot call the definition it replaces;
* a shadow ``wasi:io/poll`` must define its own ``pollable`` resource, and then wasmtime's
  ``wasi:io/streams`` (whose ``subscribe`` returns wasmtime's pollable) no longer type-checks
  ("resource type mismatch");
* the C API's async calls (which could be dropped at the deadline) abort the process: the
  WASI p2 clock needs a Tokio reactor that only a Rust embedder can provide.

So the bound is built into the interpreter instead: `clock_shim` composes a shim in front of
its monotonic clock that clamps every clock subscription to the host's ``remaining()``; see
there. ``metrics.extra["held_past_deadline_s"]`` reports how long any run held the host past
its deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import wasmtime
import zstandard
from wasmtime import component

from wasmbox.errors import ConfigError, HostFailure
from wasmbox.lifecycle import Closeable, Deadline
from wasmbox.models import Policy, Resources, Status, Task, TierName
from wasmbox.monitor import Monitor
from wasmbox.policy import Plan, apply
from wasmbox.runner import RUNNER_NAME, runner_dir, runner_source
from wasmbox.tiers.base import Availability, Outcome
from wasmbox.tiers.wasm import clock_shim, python_app
from wasmbox.tiers.wasm.engine import WASMTIME_VERSION, EngineHandle, Flavour, first_line
from wasmbox.tiers.wasm.instance_pool import InstancePool, Pooled
from wasmbox.tiers.wasm.run import (
    arm,
    classify_trap,
    close_store,
    limit_store,
    settle,
    wasi_config,
    write_atomic,
)
from wasmbox.tiers.wasm.source_scan import imported_modules
from wasmbox.workspace import RESULT_FILE, Workspace

COMPONENTIZE_PY = "0.25.1"
APP_DIR = Path(python_app.__file__).parent
PACKAGES_ROOT = "/python"
# The standard library is mounted read-only where componentize-py had it at build time, so
# the `__path__` of every snapshotted package (``/python/json``, ...) is valid at run time too.
STDLIB_ROOT = "/python"
STDLIB_KEY = f"python-stdlib-{COMPONENTIZE_PY}"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_STDLIB_MARKERS = frozenset({"os.py", "encodings/__init__.py", "pathlib/__init__.py"})
_MAX_STDLIB_BYTES = 64 << 20
BUILD_TIMEOUT = 300.0
TASK_FILENAME = "<task>"
# The snapshot instantiates a handful of core modules (interpreter, libc, adapters): the
# task cannot create instances itself, so the runtime's own need is the floor.
_MIN_INSTANCES = 32
_REASON_CHARS = 500
# Asks the interpreter what it can import: its built-in modules and what the snapshot holds
# (nothing else is importable there; see python_app).
_PROBE = """
import sys, importlib.util
def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
def main(_):
    names = set(sys.builtin_module_names) | {m.partition('.')[0] for m in sys.modules}
    return sorted(n for n in names if (not n.startswith('_') or n == '__future__')
                  and importable(n))
"""
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
        composed = Path(tmp) / "composed.wasm"
        clock_shim.compose(target, composed)
        os.replace(composed, out)


def unpack_stdlib(target: Path) -> None:
    """Unpack the CPython-for-WASI standard library componentize-py embeds into `target`.

    componentize-py carries it as a zstd-compressed tar inside its extension module (the
    exact files its interpreter was built with); it is found by its content, decompressed
    with `zstandard` (bounded in size), and unpacked without links or special files,
    read-only. Raises `HostFailure` when it cannot be found.
    """
    spec = importlib.util.find_spec("componentize_py")
    if spec is None or spec.origin is None:
        raise HostFailure("componentize-py is not installed")
    data = b"".join(p.read_bytes() for p in sorted(Path(spec.origin).parent.glob("*.so")))
    for match in re.finditer(re.escape(_ZSTD_MAGIC), data):
        tar = _decompress(data[match.start():])
        if tar is not None and _is_stdlib(tar):
            _extract(tar, target)
            return
    raise HostFailure("the standard library is not inside the installed componentize-py")


# Top-level modules of the mounted standard library that cannot import in this tier:
# the guest refuses sockets, subprocesses and ctypes (python_app.app._REFUSED), some modules
# import one of those, and some need a C module CPython-for-WASI does not build.
REFUSED_STDLIB = frozenset({
    # refused by the guest
    "socket", "select", "selectors", "ssl", "ctypes", "subprocess", "multiprocessing",
    # import a refused module
    "asyncio", "ftplib", "imaplib", "poplib", "smtplib", "socketserver", "mailbox", "pdb",
    "doctest", "ensurepip", "venv", "webbrowser", "antigravity", "pty",
    # need a C module the WASI build lacks (_bz2, _lzma, _curses, termios, _tkinter)
    "bz2", "lzma", "curses", "tty", "tkinter", "turtle", "turtledemo", "idlelib",
})


def stdlib_modules(stdlib: Path) -> frozenset[str]:
    """Top-level module names of an unpacked standard library (minus `REFUSED_STDLIB`)."""
    names: set[str] = set()
    for entry in stdlib.iterdir():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return frozenset(names - REFUSED_STDLIB)


def _decompress(data: bytes) -> bytes | None:
    """One zstd frame from the start of `data`, or None when it is not one (a stray magic
    number). The output is bounded, so no input can make the host inflate without end."""
    out = io.BytesIO()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data[:_MAX_STDLIB_BYTES]), read_across_frames=False)
        with reader:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
                if out.tell() > _MAX_STDLIB_BYTES:
                    return None
    except zstandard.ZstdError:
        pass  # the bytes after the frame are not another frame: what decoded is the frame
    return out.getvalue() if out.tell() >= 512 else None


def _is_stdlib(tar: bytes) -> bool:
    if tar[257:262] != b"ustar":
        return False
    try:
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            return set(tf.getnames()) >= _STDLIB_MARKERS
    except (tarfile.TarError, OSError):
        return False


def _extract(tar: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stdlib-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            members = [m for m in tf.getmembers()
                       if (m.isfile() or m.isdir()) and not m.name.startswith("config-")]
            tf.extractall(tmp, members=members, filter="data")
        for root, _dirs, files in os.walk(tmp):  # the guest's mount is read-only anyway
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class _Interpreter:

    handle: EngineHandle
    component: component.Component
    linker: component.Linker


class PythonRuntime(Closeable):
    """Runs Python source in a pre-initialised CPython component. Thread-safe."""

    def __init__(
        self, cache_dir: Path | None, engine_for: Callable[[Flavour], EngineHandle]
    ) -> None:
        self._cache_dir = cache_dir
        self._engine_for = engine_for
        self._scratch: Path | None = None  # our own dir when there is no disk cache
        self._interpreters: dict[Flavour, _Interpreter] = {}
        self._wheels: dict[Path, Path] = {}
        self._modules: frozenset[str] | None = None
        self._stdlib: Path | None = None
        self._lock = threading.Lock()
        self.pool = InstancePool()  # pre-instantiated interpreters (see instance_pool)

    def availability(self) -> Availability:
        """Available when the pinned componentize-py is installed; never raises."""
        try:
            found = version("componentize-py")
        except PackageNotFoundError:
            return Availability(TierName.WASM, False, "componentize-py is not installed")
        if found != COMPONENTIZE_PY:
            return Availability(TierName.WASM, False,
                                f"componentize-py {found} is installed, {COMPONENTIZE_PY} needed")
        return Availability(TierName.WASM, True, "CPython component (componentize-py)",
                            {"componentize-py": found, "wasmtime": WASMTIME_VERSION})

    def prepare(self, flavour: Flavour) -> _Interpreter:
        """The compiled interpreter for `flavour`: built, compiled and cached on first use."""
        found = self._interpreters.get(flavour)
        if found is not None:
            return found
        with self._lock:
            self._ensure_open()
            found = self._interpreters.get(flavour)
            if found is None:
                found = self._load(flavour)
                self._interpreters[flavour] = found
        return found

    def _stdlib_dir(self) -> Path:
        """The interpreter's own standard library, unpacked once into the cache, read-only."""
        if self._stdlib is None:
            directory = self._cache_dir if self._cache_dir is not None else self._scratch_dir()
            target = directory / STDLIB_KEY
            with _file_lock(directory / f"{STDLIB_KEY}.lock"):
                if not target.exists():
                    unpack_stdlib(target)
            self._stdlib = target
        return self._stdlib

    def unsuitable(self, plan: Plan) -> str | None:
        """Why this interpreter cannot run the plan's source (an import it lacks), or None.

        Only static ``import``/``from`` statements are seen, by a bounded token scan that
        never raises (see `source_scan`); a dynamic import of a missing module, or source the
        scan gives up on, still fails inside the task, as the task's outcome. Used by
        ``tier="auto"`` to escalate.
        """
        wanted = imported_modules(plan.task.source or "")
        if not wanted:
            return None
        missing = sorted(wanted - self.modules(plan) - self._package_names(plan))
        if not missing:
            return None
        return f"the wasm Python interpreter lacks {', '.join(missing)}"

    def modules(self, plan: Plan) -> frozenset[str]:
        """Top-level modules the interpreter can import: what it reports itself (asked once)
        and the modules of its mounted standard library."""
        if self._modules is None:
            listing = self._cache_path(f"{app_key()}.modules.json")
            try:
                self._modules = frozenset(json.loads(listing.read_text()))
            except (OSError, ValueError):
                self._modules = self._probe_modules(plan)
                with contextlib.suppress(OSError):
                    write_atomic(listing, json.dumps(sorted(self._modules)).encode())
            self._modules |= stdlib_modules(self._stdlib_dir())
        return self._modules

    def _probe_modules(self, plan: Plan) -> frozenset[str]:
        probe = apply(Policy(), Task.python(_PROBE, resources=Resources(timeout=30)))
        with Workspace(probe) as workspace:
            outcome = self.run(probe, workspace, Deadline(30), Monitor(probe.policy.monitor))
            result = os.path.join(workspace.output_dir, RESULT_FILE)
            if outcome.status is not Status.COMPLETED or not os.path.exists(result):
                raise HostFailure(f"the Python interpreter cannot list its modules: "
                                  f"{outcome.status} {outcome.reason}")
            with open(result, encoding="utf-8") as f:
                return frozenset(json.load(f))

    def _package_names(self, plan: Plan) -> set[str]:
        names: set[str] = set()
        for package in plan.policy.python.packages:
            host = Path(package)
            if (host / "__init__.py").exists():
                names.add(host.name)
            elif host.is_dir():
                names.update(p.stem for p in host.iterdir() if p.suffix == ".py" or p.is_dir())
            else:
                names.add(host.name.split("-")[0])  # a wheel: distribution name
        return names

    def _cache_path(self, name: str) -> Path:
        return (self._cache_dir if self._cache_dir is not None else self._scratch_dir()) / name

    def run(
        self, plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor
    ) -> Outcome:
        """Run the plan's Python source; guest faults come back as statuses."""
        t0 = time.perf_counter()
        # The Sandbox prepares before the deadline starts: building and compiling the
        # interpreter (seconds, once per cache) is the host's cost, not the task's.
        interp = self.prepare(Flavour(fuel=plan.fuel is not None, stack=plan.stack))
        paths, mounts = self._packages(plan)
        mounts[STDLIB_ROOT] = self._stdlib_dir()  # read-only, like every extra mount
        paths.insert(0, STDLIB_ROOT)
        with open(workspace.input_path, encoding="utf-8") as f:
            payload = f.read()
        pooled = self.pool.take(
            (interp, plan.memory, plan.table_elements, plan.instances),
            interp.handle.engine, interp.linker, interp.component,
            lambda s: limit_store(s, plan, _MIN_INSTANCES), plan.fuel)
        store = wasmtime.Store(interp.handle.engine) if pooled is None else pooled.store
        try:
            return _execute(
                plan, workspace, deadline, monitor, interp, store, payload, paths, mounts, t0,
                pooled, self.pool.retire,
            )
        finally:
            close_store(store)

    def _load(self, flavour: Flavour) -> _Interpreter:
        directory = self._cache_dir if self._cache_dir is not None else self._scratch_dir()
        key = app_key()
        source = directory / f"{key}.wasm"
        compiled = directory / f"{key}-{flavour.key}.cwasm"
        handle = self._engine_for(flavour)  # shared with modules: one engine, one ticker
        try:
            comp = _deserialize(handle.engine, compiled)
            if comp is None:
                with _file_lock(directory / f"{key}.lock"):
                    comp = _deserialize(handle.engine, compiled)
                    if comp is None:
                        if not source.exists():
                            build_component(source)
                        comp = component.Component.from_file(handle.engine, str(source))
                        write_atomic(compiled, comp.serialize())
        except wasmtime.WasmtimeError as exc:
            raise HostFailure(f"the Python interpreter cannot be compiled: {exc}") from exc
        self._stdlib_dir()
        linker = component.Linker(handle.engine)
        linker.add_wasip2()
        clock_shim.define(linker)
        return _Interpreter(handle, comp, linker)

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="wasmbox-python-"))
        return self._scratch

    def _packages(self, plan: Plan) -> tuple[list[str], dict[str, Path]]:
        """sys.path entries and read-only mounts for the policy's packages."""
        paths: list[str] = []
        mounts: dict[str, Path] = {}
        for i, package in enumerate(plan.policy.python.packages):
            guest = f"{PACKAGES_ROOT}/{i}"
            host = Path(package)
            if host.is_file() and host.suffix == ".whl":
                host = self._unpacked(host)
            elif not host.is_dir():
                raise ConfigError(f"python.packages: {package} is not a directory or a .whl")
            if (host / "__init__.py").exists():
                # A package directory itself: mount it under its own name, so only it is seen.
                mounts[f"{guest}/{host.name}"] = host
                paths.append(f"{host.name}={guest}/{host.name}")
            else:
                mounts[guest] = host
                paths.append(guest)
        return paths, mounts

    def _unpacked(self, wheel: Path) -> Path:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:24]
        with self._lock:
            found = self._wheels.get(wheel)
            if found is not None and found.name == digest:
                return found
            root = (self._cache_dir or self._scratch_dir()) / "wheels"
            target = root / digest
            if not target.exists():
                _unzip(wheel, root, target)
            self._wheels[wheel] = target
            return target

    def _release(self) -> None:
        self.pool.close()
        with self._lock:
            for interp in self._interpreters.values():
                interp.linker.close()
                interp.component.close()  # engines belong to the WasmTier
            self._interpreters.clear()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None


def _execute(plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
             interp: _Interpreter,
             store: wasmtime.Store, payload: str, paths: list[str], mounts: dict[str, Path],
             t0: float, pooled: Pooled | None = None,
             close: Callable[[wasmtime.Store], None] = close_store) -> Outcome:
    wasi, clock_origin = wasi_config(plan, workspace, ["python"], mounts)
    store.set_wasi(wasi)
    watchdog, _ = arm(store, plan, workspace, deadline, monitor, interp.handle, clock_origin,
                      min_instances=_MIN_INSTANCES)
    if pooled is not None and plan.fuel is not None:
        # As if instantiated here; never below 0 (set_fuel would wrap it to 2**64).
        store.set_fuel(max(0, plan.fuel - pooled.fuel_spent))

    outcome = Outcome(status=Status.COMPLETED, exit_code=0)
    verdict = None
    instantiated = False
    try:
        instance = (interp.linker.instantiate(store, interp.component) if pooled is None
                    else pooled.instance)
        instantiated = True
        run = instance.get_func(store, "run")
        if run is None:
            raise HostFailure("the Python component exports no run function")
        t1 = time.perf_counter()
        cpu0 = time.thread_time()
        outcome.startup_s = t1 - t0
        try:
            verdict = run(store, plan.task.source or "", TASK_FILENAME, plan.task.entry,
                          payload, paths)
        finally:
            outcome.run_s = time.perf_counter() - t1
            outcome.cpu_s = time.thread_time() - cpu0
    except wasmtime.ExitTrap as exc:  # os._exit() inside the task
        outcome.exit_code = exc.code
        outcome.status = Status.COMPLETED if exc.code == 0 else Status.FAILED
        outcome.reason = None if exc.code == 0 else f"the task exited with code {exc.code}"
    except wasmtime.Trap as exc:
        outcome.exit_code = None
        outcome.status, outcome.trap = classify_trap(exc)
        outcome.reason = first_line(exc.message)
    except wasmtime.WasmtimeError as exc:
        outcome.exit_code = None
        if watchdog.tripped is None:
            outcome.status, outcome.trap, outcome.reason = _classify_error(exc, instantiated, plan)

    if verdict is not None:
        _apply_verdict(outcome, verdict, plan, workspace)
    settle(outcome, plan, store, workspace, watchdog, deadline, monitor, close)
    return outcome


def _apply_verdict(outcome: Outcome, verdict: component.Record, plan: Plan,
                   workspace: Workspace) -> None:
    code: int = verdict.code
    value: str | None = verdict.value
    error: str | None = verdict.error
    outcome.exit_code = code
    if code != 0:
        outcome.status = Status.FAILED
        outcome.reason = (error or f"exit code {code}")[:_REASON_CHARS]
        if error is not None and error.startswith("MemoryError"):
            outcome.status = Status.MEMORY_EXCEEDED
            outcome.reason = f"MemoryError: the task reached its {plan.memory} byte memory cap"
        return
    if value is None:
        return
    data = value.encode()
    cap = plan.output.max_file_bytes
    if len(data) > cap:
        outcome.status = Status.OUTPUT_REJECTED
        outcome.reason = f"{RESULT_FILE} exceeds {cap} bytes"
        return
    _write_result(os.path.join(workspace.output_dir, RESULT_FILE), data)


def _write_result(path: str, data: bytes) -> None:
    # The guest may have left its own result.json (or a symlink, or a directory): the return
    # value wins, as in runner.py, and is never written through a link.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# Component calls report traps as errors whose last line names the cause.
_TRAP_CAUSES = (
    ("all fuel consumed", Status.OUT_OF_FUEL, "out_of_fuel"),
    ("interrupt", Status.TIMEOUT, "interrupt"),
    ("call stack exhausted", Status.CRASHED, "stack_overflow"),
)


def _classify_error(exc: wasmtime.WasmtimeError, instantiated: bool,
                    plan: Plan) -> tuple[Status, str | None, str]:
    message = first_line(str(exc))
    if not instantiated:
        if "memory" in message or "limit" in message:
            return (Status.MEMORY_EXCEEDED, None,
                    f"the interpreter needs more than {plan.memory} bytes")
        raise HostFailure(f"the Python component cannot be instantiated: {message}") from exc
    cause = _last_line(str(exc))
    for needle, status, trap in _TRAP_CAUSES:
        if needle in cause:
            return status, trap, cause
    return Status.CRASHED, None, cause


def _deserialize(engine: wasmtime.Engine, path: Path) -> component.Component | None:
    if not path.exists():
        return None
    try:
        return component.Component.deserialize_file(engine, str(path))
    except wasmtime.WasmtimeError:
        path.unlink(missing_ok=True)  # stale or corrupt: compile again
        return None


class _file_lock:
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


def _unzip(wheel: Path, root: Path, target: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ConfigError(f"python.packages: {wheel} has an unsafe path {name!r}")
                if name.endswith((".so", ".pyd", ".dylib")):
                    raise ConfigError(f"python.packages: {wheel} contains a C extension "
                                      f"({name}); run it in the container tier")
            zf.extractall(tmp)
        os.replace(tmp, target)
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"python.packages: cannot unpack {wheel}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _last_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[-1].strip() if text else "unknown error"



