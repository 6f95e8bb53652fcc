"""Compiled-module cache: validated once, compiled once, pre-linked once.

A module the cache has not seen is validated and compiled in a worker process
(`compile_worker`) bounded in memory, CPU and wall time by the task's timeout: a hostile
module can make compilation cost seconds and hundreds of MiB. Cache hits never leave the
process. The cost of a compile is kept with the module and reported once, in the metrics of
the run that paid for it (``extra["compile_s"]``). Runs that miss on the same module at
once share one compile: the first compiles, the others wait for it within their own budget.
Bytes refused for what they are (not WebAssembly, not a WASI command) are remembered by
digest, so sending them again costs no compile worker.

On disk, ``<dir>/<sha256>-<flavour>.cwasm`` holds wasmtime's serialized code, keyed by the
module's hash, the wasmtime version and the engine flags (a `.cwasm` is only valid for exactly
those). In memory, the `InstancePre` of the most recently used modules is kept, so a run only
pays for a Store and an instantiation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime

from wasmbox._config import HostConfig
from wasmbox._fs import write_atomic
from wasmbox.errors import HostFailure, ModuleRejected, PolicyViolation
from wasmbox.models import GiB
from wasmbox.tiers.wasm import compile_worker
from wasmbox.tiers.wasm.engine import EngineHandle, Flavour, first_line

MAX_MODULE_BYTES = 256 * 1024 * 1024
_MEMORY_ENTRIES = 64
# Refused modules remembered by digest (with the refusal's first MAX_REFUSAL_CHARS): the same
# bad bytes sent again are refused without another compile worker.
_REFUSED_ENTRIES = 256
MAX_REFUSAL_CHARS = 512
# The compile worker's bounds. Address space, not RSS: wasmtime's compile of a 3 MB
# one-function module peaks near 750 MiB resident; the interpreter and its libraries need
# a few hundred MiB of address space more.
COMPILE_ADDRESS_SPACE = 2 * GiB
# Wall time beyond the task's timeout for the worker to start (an interpreter and wasmtime),
# and the budget when the task has no timeout at all.
COMPILE_START_SECONDS = 1.0
COMPILE_MIN_SECONDS = 1.0
COMPILE_UNBOUNDED_SECONDS = 60.0


def default_cache_dir() -> Path:
    """``$WASMBOX_CACHE_DIR`` or ``~/.cache/wasmbox/modules`` (see `HostConfig`)."""
    return HostConfig.from_env().module_cache


@dataclass(frozen=True)
class Prepared:
    """A module ready to instantiate: its hash, its imports, and the pre-linked instance."""

    sha256: str
    imports: frozenset[str]
    pre: wasmtime.InstancePre | None  # None when the module cannot be linked (see link_error)
    module: wasmtime.Module
    link_error: str | None = None
    compile_s: float = 0.0  # what compiling it cost (0 when it came from the disk cache)
    # Names of the module's memory exports: a run looks up just these and `_start`, not
    # every export (wrapping each costs a few microseconds per run).
    memory_exports: tuple[str, ...] = ()
    # ``_start`` takes and returns nothing (every WASI command): a run calls it directly.
    plain_start: bool = False


class NotPoolable(HostFailure):
    """A pooled engine refused the module when loading it: it does not fit the pool's slots
    (see `engine.use_pooling`); the tier runs it on the on-demand engine instead."""


class ModuleCache:
    """Thread-safe cache of prepared modules for one engine flavour."""

    def __init__(self, handle: EngineHandle, directory: Path | None) -> None:
        self._handle = handle
        self._dir = directory
        self._lock = threading.Lock()
        self._prepared: OrderedDict[str, Prepared] = OrderedDict()
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._unclaimed: dict[str, float] = {}
        self._not_poolable: dict[str, str] = {}  # digest -> why a pooled engine refused it
        self._inflight: dict[str, _Flight] = {}  # digest -> the compile runs are waiting for
        self._refused: OrderedDict[str, str] = OrderedDict()  # digest -> why, bytes refused
        # The last bytes object hashed and its digest: a Dask chunk's tasks (and a local
        # batch's) share one module object, hashed once (~120 us for 170 KB). Holding the
        # object keeps the identity meaningful; bytes are immutable, so it is still the digest.
        self._last_hashed: tuple[bytes, str] | None = None

    def claim_compile_s(self, digest: str) -> float:
        """The compile cost of `digest` if no run has reported it yet, else 0.0."""
        with self._lock:
            return self._unclaimed.pop(digest, 0.0)

    def load_path(self, path: Path, pin: str | None, timeout: float | None = None) -> Prepared:
        """The prepared module for a file; hashes are memoised by (path, inode, size, mtime).

        A pinned module is always hashed again, so a file swapped in place is caught.
        `timeout` is the task's: a compile (cache miss) may take that long, plus the
        worker's start-up.
        """
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ModuleRejected(f"cannot read module {path}: {exc.strerror}") from exc
        stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        digest = None if pin else self._digests.get(stamp)
        if digest is not None:
            found = self._prepared.get(digest)
            if found is not None:
                return found
        if digest is not None and digest in self._not_poolable:
            raise NotPoolable(self._not_poolable[digest])
        if st.st_size > MAX_MODULE_BYTES:
            raise ModuleRejected(f"module {path} is over {MAX_MODULE_BYTES} bytes")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModuleRejected(f"cannot read module {path}: {exc.strerror}") from exc
        if not pin:  # a refusal is remembered by the stamp too (a pin hashes every time)
            self._digests[stamp] = self._digest(data)
        return self.load_bytes(data, pin, timeout)

    def load_bytes(self, data: bytes, pin: str | None, timeout: float | None = None) -> Prepared:
        """The prepared module for raw bytes; raises `ModuleRejected` if they are not valid."""
        if len(data) > MAX_MODULE_BYTES:
            raise ModuleRejected(f"module is over {MAX_MODULE_BYTES} bytes")
        digest = self._digest(data)
        if pin is not None and pin != digest:
            raise ModuleRejected(f"module sha256 is {digest}, the task pins {pin}")
        with self._lock:
            found = self._prepared.get(digest)
            if found is not None:
                self._prepared.move_to_end(digest)
                return found
            refused = self._not_poolable.get(digest)
            invalid = self._refused.get(digest)
        if invalid is not None:
            raise ModuleRejected(invalid)
        if refused is not None:
            raise NotPoolable(refused)
        try:
            return self._prepare_once(digest, data, compile_budget(timeout))
        except (CompileOverBudget, ModuleInvalid) as exc:  # the cache's own marks: callers
            raise ModuleRejected(str(exc)) from exc  # see the public type

    def _prepare_once(self, digest: str, data: bytes, budget: float) -> Prepared:
        """Prepare `digest`, or wait for the run already preparing it: one compile, not N.

        A waiter is bounded by its own `budget`. It shares a leader's refusal of the
        module; when the leader merely ran out of its own budget (or failed in some other
        way), a waiter with more time left compiles in its place.
        """
        end = time.monotonic() + budget
        left = budget
        while True:
            with self._lock:
                found = self._prepared.get(digest)
                if found is not None:
                    return found
                flight = self._inflight.get(digest)
                if flight is None:
                    flight = self._inflight[digest] = _Flight()
                    leading = True
                else:
                    flight.waiters += 1
                    leading = False
            if leading:
                return self._lead(flight, digest, data, left)
            flight.done.wait(left)
            if flight.prepared is not None:
                return flight.prepared
            if flight.refusal is not None:
                raise type(flight.refusal)(*flight.refusal.args) from flight.refusal
            left = end - time.monotonic()
            over = flight.failure if isinstance(flight.failure, CompileOverBudget) else None
            if not flight.done.is_set() or left <= (over.budget if over else 0.0):
                raise CompileOverBudget(budget)  # what compiling it here would have ended in
            # The leader was interrupted or ran out of a shorter budget than ours: retry.

    def _lead(self, flight: _Flight, digest: str, data: bytes, budget: float) -> Prepared:
        """Compile for every waiter of `flight`; the flight ends on every path."""
        try:
            prepared = self._prepare(digest, data, budget)
        except (NotPoolable, ModuleRejected) as exc:
            if isinstance(exc, CompileOverBudget):
                flight.failure = exc
            else:  # the module's own fault: the same answer for every waiter
                flight.refusal = exc
                if isinstance(exc, ModuleInvalid):  # and for every later run of these bytes
                    self._remember_refusal(digest, str(exc))
            raise
        except BaseException as exc:  # a host failure, KeyboardInterrupt: a waiter retries
            flight.failure = exc
            raise
        else:
            flight.prepared = prepared
            return prepared
        finally:
            with self._lock:
                if flight.prepared is not None:
                    self._prepared[digest] = flight.prepared
                    if flight.prepared.compile_s:
                        self._unclaimed[digest] = flight.prepared.compile_s
                    while len(self._prepared) > _MEMORY_ENTRIES:
                        self._prepared.popitem(last=False)
                del self._inflight[digest]
            flight.done.set()

    def _remember_refusal(self, digest: str, why: str) -> None:
        with self._lock:
            self._refused[digest] = why[:MAX_REFUSAL_CHARS]
            self._refused.move_to_end(digest)
            while len(self._refused) > _REFUSED_ENTRIES:
                self._refused.popitem(last=False)

    def _digest(self, data: bytes) -> str:
        """sha256 of `data`, not computed again for the same object as last time."""
        last = self._last_hashed
        if last is not None and last[0] is data:
            return last[1]
        digest = hashlib.sha256(data).hexdigest()
        if type(data) is bytes:  # only plain bytes: a bytearray or buffer could change
            self._last_hashed = (data, digest)
        return digest

    def _prepare(self, digest: str, data: bytes, budget: float) -> Prepared:
        engine = self._handle.engine
        module = self._from_disk(digest)
        compile_s = 0.0
        if module is None:
            compiled, compile_s = compile_in_worker(self._handle.flavour, data, budget)
            try:
                module = wasmtime.Module.deserialize(engine, compiled)
            except wasmtime.WasmtimeError as exc:
                if self._handle.flavour.pooled:
                    reason = f"the module does not fit the instance pool: {first_line(str(exc))}"
                    with self._lock:
                        self._not_poolable[digest] = reason
                    raise NotPoolable(reason) from exc
                raise HostFailure(f"the compile worker's output does not load: {exc}") from exc
            self._to_disk(digest, compiled)
        imports = frozenset(f"{i.module}.{i.name}" for i in module.imports)
        exports = {e.name: e.type for e in module.exports}
        start = exports.get("_start")
        if not isinstance(start, wasmtime.FuncType):
            raise ModuleInvalid("the module exports no _start: only WASI commands can run")
        plain = not start.params and not start.results
        memories = tuple(n for n, t in exports.items() if isinstance(t, wasmtime.MemoryType))
        try:
            pre = self._handle.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            # Kept, not raised: the policy's import check names the culprit more precisely.
            return Prepared(digest, imports, None, module, first_line(str(exc)), compile_s,
                            memories, plain)
        return Prepared(digest, imports, pre, module, compile_s=compile_s,
                        memory_exports=memories, plain_start=plain)

    def _path(self, digest: str) -> Path | None:
        if self._dir is None:
            return None
        return self._dir / f"{digest}-{self._handle.flavour.key}.cwasm"

    def _from_disk(self, digest: str) -> wasmtime.Module | None:
        path = self._path(digest)
        if path is None or not path.exists():
            return None
        try:
            return wasmtime.Module.deserialize_file(self._handle.engine, str(path))
        except wasmtime.WasmtimeError:
            path.unlink(missing_ok=True)  # stale or corrupt: recompile
            return None

    def _to_disk(self, digest: str, compiled: bytes) -> None:
        path = self._path(digest)
        if path is None:
            return
        # The cache is an optimisation: a read-only home must not fail the run.
        with contextlib.suppress(OSError):
            write_atomic(path, compiled)

    def clear(self) -> None:
        """Drop the in-memory entries (the disk cache stays)."""
        with self._lock:
            for prepared in self._prepared.values():
                if prepared.pre is not None:
                    prepared.pre.close()
                prepared.module.close()
            self._prepared.clear()
            self._digests.clear()
            self._unclaimed.clear()
            self._not_poolable.clear()
            self._refused.clear()
            self._last_hashed = None


class CompileOverBudget(ModuleRejected):
    """Compiling the module took longer than the run's `budget` of wall or CPU seconds.

    Internal to this module: `ModuleCache` raises it as a plain `ModuleRejected` (the error
    tree, the CLI and the process-pool wire know only the public names).
    """

    def __init__(self, budget: float, message: str | None = None) -> None:
        super().__init__(message or f"compiling the module took longer than its {budget:g} s "
                                    "budget (the task's timeout)")
        self.budget = budget

    def __reduce__(self) -> tuple[type[CompileOverBudget], tuple[float, str]]:
        return (CompileOverBudget, (self.budget, str(self)))


class ModuleInvalid(ModuleRejected):
    """The bytes themselves are refused, whatever the budget: not valid WebAssembly, or not a
    WASI command. The same bytes always get the same answer, so `ModuleCache` remembers it
    by digest (bounded) and refuses them again without a compile worker.

    Internal to this module, like `CompileOverBudget`: callers see a plain `ModuleRejected`.
    """


@dataclass(eq=False)
class _Flight:
    """One compile in progress and, once `done` is set, how it ended."""

    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0  # runs that waited on it (a count of arrivals, never lowered)
    prepared: Prepared | None = None
    refusal: Exception | None = None  # the module's own fault, shared with every waiter
    failure: BaseException | None = None  # the leader's, not the module's: a waiter retries


def compile_budget(timeout: float | None) -> float:
    """Wall seconds a compile may take for a task with `timeout`."""
    if timeout is None:
        return COMPILE_UNBOUNDED_SECONDS
    return max(timeout, COMPILE_MIN_SECONDS) + COMPILE_START_SECONDS


def compile_in_worker(
    flavour: Flavour, data: bytes, seconds: float, address_space: int = COMPILE_ADDRESS_SPACE,
) -> tuple[bytes, float]:
    """Validate and compile `data` in a bounded worker process: (serialized code, seconds).

    Raises `ModuleRejected` for an invalid module and for one whose compilation exceeds its
    budget (`seconds` of wall time and as much CPU time, a task's `compile_budget`:
    `CompileOverBudget`; `address_space` bytes); the worker is killed, never left behind.
    """
    argv = [sys.executable, "-I", compile_worker.__file__, str(int(flavour.fuel)),
            str(flavour.stack), str(address_space), str(math.ceil(seconds))]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=seconds,
                              check=False)
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped the worker
        raise CompileOverBudget(seconds) from exc
    except OSError as exc:
        raise HostFailure(f"cannot start the compile worker: {exc}") from exc
    elapsed = time.perf_counter() - t0
    if done.returncode == 0:
        return done.stdout, elapsed
    detail = first_line(done.stderr.decode("utf-8", "replace") or "no output")
    if done.returncode == compile_worker.EXIT_INVALID:
        raise ModuleInvalid(f"not a valid WebAssembly module: {detail}")
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise CompileOverBudget(seconds, f"compiling the module used more than "
                                         f"{math.ceil(seconds)} s of CPU time")
    # An allocation refused under RLIMIT_AS aborts the worker (or raises MemoryError).
    raise ModuleRejected(f"compiling the module failed within {address_space} bytes of "
                         f"address space (worker exit {done.returncode}: {detail})")


def check_imports(prepared: Prepared, allowed: frozenset[str]) -> wasmtime.InstancePre:
    """The module's InstancePre once its imports pass the policy.

    Raises `PolicyViolation` naming every import the policy does not allow, and
    `ModuleRejected` for a module whose allowed imports still cannot be linked.
    """
    forbidden = sorted(prepared.imports - allowed)
    if forbidden:
        raise PolicyViolation(
            "wasi.allowed_imports", f"the module imports {', '.join(forbidden)}"
        )
    if prepared.pre is None:
        raise ModuleRejected(f"the module cannot be linked: {prepared.link_error}")
    return prepared.pre


