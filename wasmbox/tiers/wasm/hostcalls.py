"""Host-side WASI calls that must answer to the run's limits, shadowing wasmtime's own.

wasmtime's WASI ``poll_oneoff`` blocks the host thread inside a host call, where no epoch
check can reach it: a guest calling ``sleep(6)`` held its thread 6 s past a 1 s deadline.
Our `poll_oneoff` replaces it in the engine's (shared, pre-linked) Linker. It reads the
subscriptions from guest memory, waits for the earliest clock but never past the run's
deadline, and writes the events back in the WASI preview 1 layout. A wait cut short by the
deadline trips the run's watchdog, so the run ends TIMEOUT (clock waits are wall time).

Open files are the host process's file descriptors: a guest opening files forever used to
exhaust them (EMFILE in every other thread of the host). ``path_open`` (the only WASI
preview 1 call that makes a new fd) is shadowed to refuse with EMFILE once the run holds
`MAX_OPEN_FILES`, and ``fd_close`` / ``fd_renumber`` to count the fds given back. The real
calls still do the work: wasmtime's WASI needs its caller to export the guest's memory, so
the shadows call them through a tiny per-store module (`_TRAMPOLINE`) that imports the
guest's memory and re-exports it, instantiated on the run's first shadowed call.

The Linker is shared by every store of an engine, so each call finds its run in a registry
keyed by the store's context address: `register` in `arm`, `unregister` before the store
is closed.

The three fd shadows are on every task's path (a WASI hello opens result.json), so they are
raw ``wasmtime_linker_define_func_unchecked`` callbacks: the guest's arguments arrive as a
``wasmtime_val_raw_t`` buffer that is handed unchanged to the real call (same signature), and
the trampoline is built with the C API directly. wasmtime-py's own wrapper (a `Caller`, typed
values, an exports dict) cost ~150 µs a run here.

Internal. The registry lives in `_wasi_runs`, ``poll_oneoff`` and the clock shim's
``remaining`` in `_wasi_poll`; their public names are re-exported here.
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _ffi as ffi

from wasmbox.tiers.wasm._wasi_poll import poll_oneoff as poll_oneoff
from wasmbox.tiers.wasm._wasi_poll import remaining_ns as remaining_ns
from wasmbox.tiers.wasm._wasi_runs import DEADLINE_REASON as DEADLINE_REASON
from wasmbox.tiers.wasm._wasi_runs import ERRNO_FAULT, ERRNO_IO, ERRNO_MFILE, ERRNO_SUCCESS, RUNS
from wasmbox.tiers.wasm._wasi_runs import WASI as WASI
from wasmbox.tiers.wasm._wasi_runs import RunHost as RunHost
from wasmbox.tiers.wasm._wasi_runs import register as register
from wasmbox.tiers.wasm._wasi_runs import unregister as unregister

MAX_OPEN_FILES = 256  # per run, beyond stdio and the preopens
# Instances a run needs beyond the guest's own: the trampoline.
EXTRA_INSTANCES = 1

_PATH_OPEN = ["i32", "i32", "i32", "i32", "i32", "i64", "i64", "i32", "i32"]
_SHADOWED = (b"path_open", b"fd_close", b"fd_renumber")
_WASI_BYTES = WASI.encode()
_TRAMPOLINE = """
(module
  (import "wasmbox" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_renumber"
    (func $fd_renumber (param i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    (call $path_open (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
                     (local.get 5) (local.get 6) (local.get 7) (local.get 8)))
  (func (export "fd_close") (param i32) (result i32) (call $fd_close (local.get 0)))
  (func (export "fd_renumber") (param i32 i32) (result i32)
    (call $fd_renumber (local.get 0) (local.get 1))))
"""


class WasiCalls:
    """Per engine: wasmtime's unshadowed WASI and the trampoline module that reaches it."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.linker = wasmtime.Linker(engine)
        self.linker.define_wasi()
        self.module = wasmtime.Module(engine, wasmtime.wat2wasm(_TRAMPOLINE))

    def trampoline(
        self, caller: ctypes._Pointer[ffi.wasmtime_caller_t]
    ) -> dict[str, ffi.wasmtime_func_t]:
        """Instantiate the trampoline in the caller's store, over the caller's memory.

        Raises `wasmtime.WasmtimeError` when the guest exports no memory or the instance
        cannot be made (the store's instance limit).
        """
        context = ffi.wasmtime_caller_context(caller)
        imports = (ffi.wasmtime_extern_t * (1 + len(_SHADOWED)))()
        if not ffi.wasmtime_caller_export_get(caller, b"memory", 6, ctypes.byref(imports[0])):
            raise wasmtime.WasmtimeError("the guest exports no memory")
        if imports[0].kind != ffi.WASMTIME_EXTERN_MEMORY.value:
            ffi.wasmtime_extern_delete(ctypes.byref(imports[0]))
            raise wasmtime.WasmtimeError("the guest's memory export is not a memory")
        for i, name in enumerate(_SHADOWED, start=1):
            if not ffi.wasmtime_linker_get(self.linker.ptr(), context, _WASI_BYTES,
                                           len(_WASI_BYTES), name, len(name),
                                           ctypes.byref(imports[i])):
                raise wasmtime.WasmtimeError(f"wasmtime's WASI lacks {name.decode()}")
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_instance_new(context, self.module.ptr(), imports, len(imports),
                                          ctypes.byref(instance), ctypes.byref(trap))
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            ffi.wasm_trap_delete(trap)
            raise wasmtime.WasmtimeError("the trampoline trapped while instantiating")
        found = {}
        for name in _SHADOWED:
            item = ffi.wasmtime_extern_t()
            if not ffi.wasmtime_instance_export_get(context, ctypes.byref(instance), name,
                                                   len(name), ctypes.byref(item)):
                raise wasmtime.WasmtimeError(f"the trampoline lacks {name.decode()}")
            found[name.decode()] = item.of.func
        return found

    def close(self) -> None:
        """Release the linker and module."""
        self.module.close()
        self.linker.close()


def define(linker: wasmtime.Linker) -> None:
    """Shadow wasmtime's WASI calls in `linker` (which already has ``define_wasi``)."""
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    linker.allow_shadowing = True
    linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]),
                       poll_oneoff, access_caller=True)
    open_params = [i64 if t == "i64" else i32 for t in _PATH_OPEN]
    for name, params, callback in (
        ("path_open", open_params, _PATH_OPEN_CB),
        ("fd_close", [i32], _FD_CLOSE_CB),
        ("fd_renumber", [i32, i32], _FD_RENUMBER_CB),
    ):
        ty = wasmtime.FuncType(params, [i32])
        raw = name.encode()
        error = ffi.wasmtime_linker_define_func_unchecked(
            linker.ptr(), _WASI_BYTES, len(_WASI_BYTES), raw, len(raw), ty.ptr(), callback,
            None, _NO_FINALIZER)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
    linker.allow_shadowing = False


def _shadow(
    caller: ctypes._Pointer[ffi.wasmtime_caller_t], args: ctypes._Pointer[ffi.wasmtime_val_raw_t],
    nargs: int, name: str, delta: int,
) -> None:
    """Run wasmtime's own `name` on the guest's raw arguments, counting the run's open files
    by `delta` on success; the errno is left in ``args[0]`` whatever happens.

    The argument buffer is the real call's too: the trampoline's signatures are the guest's.
    An exception must not leave a host call (a raw callback has nowhere to put it).
    """
    try:
        context = ffi.wasmtime_caller_context(caller)
        run = RUNS.get(ctypes.cast(context, ctypes.c_void_p).value or 0)
        if run is None:
            args[0].i32 = ERRNO_FAULT
            return
        if delta > 0 and run.open_files >= MAX_OPEN_FILES:
            run.refused_opens += 1
            args[0].i32 = ERRNO_MFILE
            return
        errno = _call_raw(run, caller, context, name, args, nargs)
        if errno == ERRNO_SUCCESS and delta:
            run.open_files = max(0, run.open_files + delta)
            run.open_files_peak = max(run.open_files_peak, run.open_files)
        args[0].i32 = errno
    except Exception:
        args[0].i32 = ERRNO_IO


def _call_raw(
    run: RunHost, caller: ctypes._Pointer[ffi.wasmtime_caller_t],
    context: ctypes._Pointer[ffi.wasmtime_context_t], name: str,
    args: ctypes._Pointer[ffi.wasmtime_val_raw_t], nargs: int,
) -> int:
    """wasmtime's own `name` on `args` (in place), as an errno.

    The nested call fails only when the run is being stopped (deadline, fuel, watchdog), or
    the trampoline cannot be made (no memory export, the instance limit): that stop lands at
    the guest's next check anyway.
    """
    try:
        func = run.real(caller)[name]
    except wasmtime.WasmtimeError:
        return ERRNO_IO
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    error = ffi.wasmtime_func_call_unchecked(context, ctypes.byref(func), args, nargs,
                                             ctypes.byref(trap))
    if error:
        ffi.wasmtime_error_delete(error)
        return ERRNO_IO
    if trap:
        ffi.wasm_trap_delete(trap)
        return ERRNO_IO
    return int(args[0].i32)


def _path_open(_env: int | None, caller: ctypes._Pointer[ffi.wasmtime_caller_t],
               args: ctypes._Pointer[ffi.wasmtime_val_raw_t], nargs: int) -> int:
    """WASI ``path_open``, refused with EMFILE once the run holds `MAX_OPEN_FILES`."""
    _shadow(caller, args, nargs, "path_open", +1)
    return 0


def _fd_close(_env: int | None, caller: ctypes._Pointer[ffi.wasmtime_caller_t],
              args: ctypes._Pointer[ffi.wasmtime_val_raw_t], nargs: int) -> int:
    """WASI ``fd_close``; a closed fd is one more the run may open."""
    _shadow(caller, args, nargs, "fd_close", -1)
    return 0


def _fd_renumber(_env: int | None, caller: ctypes._Pointer[ffi.wasmtime_caller_t],
                 args: ctypes._Pointer[ffi.wasmtime_val_raw_t], nargs: int) -> int:
    """WASI ``fd_renumber``: `to`'s old file is closed, `fd` lives on as `to`."""
    _shadow(caller, args, nargs, "fd_renumber", -1)
    return 0


# Module-level references keep the C trampolines alive for as long as any linker holds them.
_PATH_OPEN_CB = ffi.wasmtime_func_unchecked_callback_t(_path_open)
_FD_CLOSE_CB = ffi.wasmtime_func_unchecked_callback_t(_fd_close)
_FD_RENUMBER_CB = ffi.wasmtime_func_unchecked_callback_t(_fd_renumber)
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()


