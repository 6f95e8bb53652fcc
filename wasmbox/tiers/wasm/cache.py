"""Compiled-module cache: validated once, compiled once, pre-linked once.

On disk, ``<dir>/<sha256>-<flavour>.cwasm`` holds wasmtime's serialized code, keyed by the
module's hash, the wasmtime version and the engine flags (a `.cwasm` is only valid for exactly
those). In memory, the `InstancePre` of the most recently used modules is kept, so a run only
pays for a Store and an instantiation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from wasmbox.errors import ModuleRejected, PolicyViolation
from wasmbox.tiers.wasm.engine import EngineHandle, first_line
from wasmbox.tiers.wasm.run import write_atomic

MAX_MODULE_BYTES = 256 * 1024 * 1024
_MEMORY_ENTRIES = 64


def default_cache_dir() -> Path:
    """``$WASMBOX_CACHE_DIR`` or ``~/.cache/wasmbox/modules``."""
    env = os.environ.get("WASMBOX_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wasmbox" / "modules"


@dataclass(frozen=True)
class Prepared:
    """A module ready to instantiate: its hash, its imports, and the pre-linked instance."""

    sha256: str
    imports: frozenset[str]
    pre: wasmtime.InstancePre | None  # None when the module cannot be linked (see link_error)
    module: wasmtime.Module
    link_error: str | None = None


class ModuleCache:
    """Thread-safe cache of prepared modules for one engine flavour."""

    def __init__(self, handle: EngineHandle, directory: Path | None) -> None:
        self._handle = handle
        self._dir = directory
        self._lock = threading.Lock()
        self._prepared: OrderedDict[str, Prepared] = OrderedDict()
        self._digests: dict[tuple[str, int, int, int], str] = {}

    def load_path(self, path: Path, pin: str | None) -> Prepared:
        """The prepared module for a file; hashes are memoised by (path, inode, size, mtime).

        A pinned module is always hashed again, so a file swapped in place is caught.
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
        if st.st_size > MAX_MODULE_BYTES:
            raise ModuleRejected(f"module {path} is over {MAX_MODULE_BYTES} bytes")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModuleRejected(f"cannot read module {path}: {exc.strerror}") from exc
        prepared = self.load_bytes(data, pin)
        self._digests[stamp] = prepared.sha256
        return prepared

    def load_bytes(self, data: bytes, pin: str | None) -> Prepared:
        """The prepared module for raw bytes; raises `ModuleRejected` if they are not valid."""
        if len(data) > MAX_MODULE_BYTES:
            raise ModuleRejected(f"module is over {MAX_MODULE_BYTES} bytes")
        digest = hashlib.sha256(data).hexdigest()
        if pin is not None and pin != digest:
            raise ModuleRejected(f"module sha256 is {digest}, the task pins {pin}")
        with self._lock:
            found = self._prepared.get(digest)
            if found is not None:
                self._prepared.move_to_end(digest)
                return found
        prepared = self._prepare(digest, data)
        with self._lock:
            self._prepared[digest] = prepared
            while len(self._prepared) > _MEMORY_ENTRIES:
                self._prepared.popitem(last=False)
        return prepared

    def _prepare(self, digest: str, data: bytes) -> Prepared:
        engine = self._handle.engine
        module = self._from_disk(digest)
        if module is None:
            try:
                wasmtime.Module.validate(engine, data)
                module = wasmtime.Module(engine, data)
            except wasmtime.WasmtimeError as exc:
                reason = first_line(str(exc))
                raise ModuleRejected(f"not a valid WebAssembly module: {reason}") from exc
            self._to_disk(digest, module)
        imports = frozenset(f"{i.module}.{i.name}" for i in module.imports)
        exports = {e.name for e in module.exports}
        if "_start" not in exports:
            raise ModuleRejected("the module exports no _start: only WASI commands can run")
        try:
            pre = self._handle.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            # Kept, not raised: the policy's import check names the culprit more precisely.
            return Prepared(digest, imports, None, module, first_line(str(exc)))
        return Prepared(sha256=digest, imports=imports, pre=pre, module=module)

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

    def _to_disk(self, digest: str, module: wasmtime.Module) -> None:
        path = self._path(digest)
        if path is None:
            return
        # The cache is an optimisation: a read-only home must not fail the run.
        with contextlib.suppress(OSError):
            write_atomic(path, module.serialize())

    def clear(self) -> None:
        """Drop the in-memory entries (the disk cache stays)."""
        with self._lock:
            for prepared in self._prepared.values():
                if prepared.pre is not None:
                    prepared.pre.close()
                prepared.module.close()
            self._prepared.clear()
            self._digests.clear()


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


