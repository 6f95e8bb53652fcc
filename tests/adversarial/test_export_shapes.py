"""Threat: a module whose exports have unexpected shapes.

The wasm tier looks up only ``_start`` and the memory exports per run (names recorded when
the module is prepared). A module exporting ``_start`` as something other than a function
must be refused as a module error at prepare time, never reach the run as a host assert;
memories exported under several names are still counted once and all are found.
"""

from __future__ import annotations

import pytest
import wasmtime

from wasmbox import Sandbox, Task
from wasmbox.errors import ModuleRejected
from wasmbox.models import Status


@pytest.mark.parametrize("export", [
    '(func $f) (export "_start" (memory 0)) (export "f" (func $f))',
    '(global (export "_start") i32 (i32.const 0))',
    '(table (export "_start") 1 funcref)',
])
def test_a_start_that_is_not_a_function_is_rejected(sandbox: Sandbox, export: str) -> None:
    wat = f'(module (memory (export "memory") 1) {export})'
    with pytest.raises(ModuleRejected, match="_start"):
        sandbox.run(Task.wasm(wasmtime.wat2wasm(wat)))


def test_a_memory_under_a_late_name_is_still_measured(sandbox: Sandbox) -> None:
    # The only memory is exported under a name sorting after _start, and grown by the guest:
    # the run must find it by its recorded name and report its size.
    wat = """(module
      (memory $m 1)
      (export "zz_heap" (memory $m))
      (func (export "_start") (drop (memory.grow (i32.const 3)))))"""
    result = sandbox.run(Task.wasm(wasmtime.wat2wasm(wat)))
    assert result.status is Status.COMPLETED, result
    assert result.metrics.peak_memory_bytes == 4 * 65536
