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

The pieces live in internal modules by concern: `_python_build` (building and caching the
component), `_python_stdlib` (its standard library), `_python_packages` (the policy's
packages and wheels) and `_python_exec` (one run); this module is the runtime that ties them
together and probes what a task can import.

Internal: reached through the wasm tier (``Task.python(..., tier="wasm")``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import wasmtime
from wasmtime import component

from wasmbox._fs import write_atomic
from wasmbox._lazy import Lazy, LazyMap
from wasmbox.errors import HostFailure
from wasmbox.lifecycle import Closeable, Deadline
from wasmbox.models import Policy, Resources, Status, Task, TierName
from wasmbox.monitor import Monitor
from wasmbox.packages import unpack_wheel
from wasmbox.policy import Plan, apply
from wasmbox.tiers.base import Availability, Outcome
from wasmbox.tiers.wasm import clock_shim
from wasmbox.tiers.wasm._python_build import (
    APP_DIR,
    BUILD_TIMEOUT,
    COMPONENTIZE_PY,
    app_key,
    build_component,
    compiled_component,
    file_lock,
)
from wasmbox.tiers.wasm._python_exec import (
    TASK_FILENAME,
    Interpreter,
    execute,
    pool_world,
    warm_up,
)
from wasmbox.tiers.wasm._python_packages import (
    PACKAGES_ROOT,
    package_mounts,
    package_names,
)
from wasmbox.tiers.wasm._python_stdlib import (
    REFUSED_STDLIB,
    STDLIB_KEY,
    STDLIB_ROOT,
    stdlib_modules,
    unpack_stdlib,
)
from wasmbox.tiers.wasm.engine import WASMTIME_VERSION, EngineHandle, Flavour
from wasmbox.tiers.wasm.instance_pool import InstancePool
from wasmbox.tiers.wasm.source_scan import imported_modules
from wasmbox.workspace import RESULT_FILE, Workspace

__all__ = [
    "APP_DIR", "BUILD_TIMEOUT", "COMPONENTIZE_PY", "PACKAGES_ROOT", "REFUSED_STDLIB",
    "STDLIB_KEY", "STDLIB_ROOT", "TASK_FILENAME", "PythonRuntime", "app_key",
    "build_component", "stdlib_modules", "unpack_stdlib",
]

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


@dataclass(frozen=True)
class PythonReady:
    """What a run of one plan needs, found once in `PythonRuntime.ready`: the compiled
    interpreter, and the sys.path entries and read-only mounts (packages, stdlib)."""

    interp: Interpreter
    paths: tuple[str, ...]
    mounts: dict[str, Path]


class PythonRuntime(Closeable):
    """Runs Python source in a pre-initialised CPython component. Thread-safe."""

    def __init__(
        self, cache_dir: Path | None, engine_for: Callable[[Flavour], EngineHandle]
    ) -> None:
        self._cache_dir = cache_dir
        self._engine_for = engine_for
        # Our own directory when there is no disk cache.
        self._scratch = Lazy(lambda: Path(tempfile.mkdtemp(prefix="wasmbox-python-")))
        self._interpreters: LazyMap[Flavour, Interpreter] = LazyMap()
        self._modules = Lazy(self._list_modules)
        self._stdlib = Lazy(self._unpack_stdlib)
        # Every prepare asks: importlib.metadata costs ~0.7 ms a look-up, a third of a task.
        self._availability = Lazy(_componentize_py_availability)
        self.pool = InstancePool()  # pre-instantiated interpreters (see instance_pool)

    def availability(self) -> Availability:
        """Available when the pinned componentize-py is installed (looked up once); never
        raises."""
        return self._availability.get()

    def prepare(self, flavour: Flavour) -> Interpreter:
        """The compiled interpreter for `flavour`: built, compiled and cached on first use."""
        def make() -> Interpreter:
            self._ensure_open()
            return self._load(flavour)

        return self._interpreters.get(flavour, make)

    def _stdlib_dir(self) -> Path:
        """The interpreter's own standard library, unpacked once into the cache, read-only."""
        return self._stdlib.get()

    def _unpack_stdlib(self) -> Path:
        directory = self._directory()
        target = directory / STDLIB_KEY
        with file_lock(directory / f"{STDLIB_KEY}.lock"):
            if not target.exists():
                unpack_stdlib(target)
        return target

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
        missing = sorted(wanted - self.modules(plan) - package_names(plan.policy.python.packages))
        if not missing:
            return None
        return f"the wasm Python interpreter lacks {', '.join(missing)}"

    def modules(self, plan: Plan) -> frozenset[str]:
        """Top-level modules the interpreter can import: what it reports itself (asked once)
        and the modules of its mounted standard library."""
        return self._modules.get()

    def _list_modules(self) -> frozenset[str]:
        listing = self._directory() / f"{app_key()}.modules.json"
        try:
            found = frozenset(json.loads(listing.read_text()))
        except (OSError, ValueError):
            found = self._probe_modules()
            with contextlib.suppress(OSError):
                write_atomic(listing, json.dumps(sorted(found)).encode())
        return found | stdlib_modules(self._stdlib_dir())

    def _probe_modules(self) -> frozenset[str]:
        probe = apply(Policy(), Task.python(_PROBE, resources=Resources(timeout=30)))
        with Workspace(probe) as workspace:
            outcome = self.run(probe, workspace, Deadline(30), Monitor(probe.policy.monitor))
            result = os.path.join(workspace.output_dir, RESULT_FILE)
            if outcome.status is not Status.COMPLETED or not os.path.exists(result):
                raise HostFailure(f"the Python interpreter cannot list its modules: "
                                  f"{outcome.status} {outcome.reason}")
            with open(result, encoding="utf-8") as f:
                return frozenset(json.load(f))

    def _directory(self) -> Path:
        """Where the interpreter, its standard library and unpacked wheels are kept: the disk
        cache, else a directory of our own (removed on close)."""
        return self._cache_dir if self._cache_dir is not None else self._scratch.get()

    def ready(self, plan: Plan, flavour: Flavour) -> PythonReady:
        """Everything a run of `plan` needs but its workspace: the interpreter (built and
        compiled on first use) and the packages (read, hashed and unpacked here, once)."""
        interp = self.prepare(flavour)
        paths, mounts = package_mounts(plan.policy.python.packages, self._unpacked)
        mounts[STDLIB_ROOT] = self._stdlib_dir()  # read-only, like every extra mount
        return PythonReady(interp, (STDLIB_ROOT, *paths), mounts)

    def run(
        self, plan: Plan, workspace: Workspace, deadline: Deadline, monitor: Monitor,
        ready: PythonReady | None = None,
    ) -> Outcome:
        """Run the plan's Python source; guest faults come back as statuses.

        `ready` comes from `ready()`, called before the deadline started: building and
        compiling the interpreter (seconds, once per cache) is the host's cost, not the task's.
        """
        t0 = time.perf_counter()
        if ready is None:
            ready = self.ready(plan, Flavour(fuel=plan.fuel is not None, stack=plan.stack))
        payload = workspace.input_bytes.decode("utf-8")  # what input.json holds, not re-read
        interp = ready.interp
        env = tuple(plan.env.items())  # read by the warm-up call: part of the key
        pooled = self.pool.take(
            (interp, plan.memory, plan.table_elements, plan.instances, env),
            interp.handle.engine, interp.linker, interp.component,
            lambda s: pool_world(s, plan), plan.fuel, warm_up)
        store = None if pooled is None else pooled.store
        try:
            if store is None:
                store = wasmtime.Store(interp.handle.engine)
            return execute(plan, workspace, deadline, monitor, interp, store, payload,
                           list(ready.paths), ready.mounts, t0, pooled)
        finally:
            self.pool.retire(store)  # closes it; every take is retired, on every path

    def _load(self, flavour: Flavour) -> Interpreter:
        handle = self._engine_for(flavour)  # shared with modules: one engine, one ticker
        comp = compiled_component(handle.engine, self._directory(), flavour.key)
        self._stdlib_dir()
        linker = component.Linker(handle.engine)
        linker.add_wasip2()
        clock_shim.define(linker)
        return Interpreter(handle, comp, linker)

    def _unpacked(self, wheel: Path) -> Path:
        # Hashed once per version of the file (`packages` keys its digest by inode and mtime).
        return unpack_wheel(wheel, self._directory() / "wheels")

    def _release(self) -> None:
        self.pool.close()
        for interp in self._interpreters.take_all():
            interp.linker.close()
            interp.component.close()  # engines belong to the WasmTier
        self._stdlib.take()
        scratch = self._scratch.take()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _componentize_py_availability() -> Availability:
    try:
        found = version("componentize-py")
    except PackageNotFoundError:
        return Availability(TierName.WASM, False, "componentize-py is not installed")
    if found != COMPONENTIZE_PY:
        return Availability(TierName.WASM, False,
                            f"componentize-py {found} is installed, {COMPONENTIZE_PY} needed")
    return Availability(TierName.WASM, True, "CPython component (componentize-py)",
                        {"componentize-py": found, "wasmtime": WASMTIME_VERSION})
