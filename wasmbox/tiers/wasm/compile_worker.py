"""The engine flags of the wasm tier, and the worker process that compiles untrusted modules.

Compiling is work a hostile module chooses: one huge function costs seconds of CPU and
hundreds of MiB. So a module the cache has never seen is compiled here, in a child process
under RLIMIT_AS and RLIMIT_CPU that the parent kills at the task's deadline; the parent loads
the result (wasmtime's serialized code) exactly as it loads the disk cache.

Run as a script (``python -I compile_worker.py FUEL STACK ADDRESS_SPACE CPU_SECONDS``) with
the module's bytes on stdin; it writes the serialized module to stdout and exits 0, or
writes the validation error to stderr and exits `EXIT_INVALID`. It imports only wasmtime, so
it starts fast and the flags below are the single source of truth for both processes.
"""

from __future__ import annotations

import resource
import sys

import wasmtime

EXIT_INVALID = 65

# Proposals that would let a module escape or multiply the per-store memory cap are off:
# several memories each grow to the cap (N times the limit), and GC objects and exceptions
# (which wasmtime allocates on the GC heap) live outside linear memory, unseen by the memory
# cap and the monitor. Threads bring shared memories. A module using any of these is refused
# at validation (`ModuleRejected`). Part of every cache key: compiled code depends on them.
FEATURES_KEY = "mm0-gc0-exn0-fref0-thr0"


def engine_config(fuel: bool, stack: int) -> wasmtime.Config:
    """The Config every wasm-tier Engine is built from, in the host and in the worker."""
    config = wasmtime.Config()
    config.consume_fuel = fuel
    config.epoch_interruption = True
    config.max_wasm_stack = stack
    config.cranelift_opt_level = "speed"
    config.wasm_multi_memory = False
    config.wasm_gc = False
    config.wasm_function_references = False
    config.wasm_exceptions = False
    config.wasm_threads = False
    config.gc_support = False
    return config


def main(argv: list[str]) -> int:
    """Compile stdin's module under the given limits; see the module docstring."""
    fuel, stack, address_space, cpu_seconds = (int(a) for a in argv)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    data = sys.stdin.buffer.read()
    engine = wasmtime.Engine(engine_config(bool(fuel), stack))
    try:
        wasmtime.Module.validate(engine, data)
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        sys.stderr.write(str(exc))
        return EXIT_INVALID
    sys.stdout.buffer.write(module.serialize())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
