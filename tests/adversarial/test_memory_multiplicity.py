"""Class 7: a module must not get more memory than its one capped linear memory.

Threat: the store's memory cap applies per memory, so a module declaring four memories could
grow each to the cap (4x the limit, reported as 1x); objects on the GC heap (GC proposal, and
exceptions, which wasmtime allocates there) live outside linear memory entirely, unseen by the
cap and the monitor. The engine now refuses the multi-memory, GC, function-references,
exceptions and threads proposals, so such a module is a `ModuleRejected` before it runs, and
`peak_memory_bytes` counts every memory the instance exports, whatever its export name.
"""

from __future__ import annotations

import pytest
import wasmtime

from wasmbox import Resources, Sandbox, Status, Task
from wasmbox.errors import ModuleRejected

WASM_PAGE = 65536

FOUR_MEMORIES = """
(module
  (memory $a 1) (memory $b 1) (memory $c 1) (memory $d 1)
  (export "memory" (memory $a))
  (func (export "_start")
    (drop (memory.grow $a (i32.const 256)))
    (drop (memory.grow $b (i32.const 256)))
    (drop (memory.grow $c (i32.const 256)))
    (drop (memory.grow $d (i32.const 256)))))
"""

GC_HEAP = """
(module
  (type $big (array (mut i64)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $again
      (drop (array.new_default $big (i32.const 1000000)))
      (br $again))))
"""

EXCEPTIONS = """
(module
  (tag $boom (param i64))
  (memory (export "memory") 1)
  (func (export "_start") (throw $boom (i64.const 1))))
"""

SHARED_MEMORY = """
(module
  (memory (export "memory") 1 100 shared)
  (func (export "_start")))
"""

FUNCTION_REFERENCES = """
(module
  (type $f (func))
  (memory (export "memory") 1)
  (func $nop)
  (elem declare func $nop)
  (func (export "_start") (call_ref $f (ref.func $nop))))
"""


@pytest.mark.parametrize(
    ("wat", "proposal"),
    [
        (FOUR_MEMORIES, "multiple memories"),
        (GC_HEAP, "gc"),
        (EXCEPTIONS, "exception"),
        (SHARED_MEMORY, "threads"),
        (FUNCTION_REFERENCES, "function references"),
    ],
    ids=["four-memories", "gc-heap", "exceptions", "shared-memory", "function-references"],
)
def test_module_using_a_heap_multiplying_proposal_is_rejected(
    sandbox: Sandbox, wat: str, proposal: str
) -> None:
    task = Task.wasm(bytes(wasmtime.wat2wasm(wat)), resources=Resources(memory="16M", timeout=5))
    with pytest.raises(ModuleRejected, match="not a valid WebAssembly module") as caught:
        sandbox.run(task)
    assert proposal in str(caught.value).lower().replace("_", " ")


def test_peak_memory_counts_a_memory_exported_under_another_name(sandbox: Sandbox) -> None:
    # Before, only an export named "memory" was measured: this run reported None.
    wat = """
    (module
      (memory (export "heap") 1)
      (func (export "_start") (drop (memory.grow (i32.const 15)))))
    """
    r = sandbox.run(Task.wasm(bytes(wasmtime.wat2wasm(wat))))
    assert r.status is Status.COMPLETED
    assert r.metrics.peak_memory_bytes == 16 * WASM_PAGE


def test_peak_memory_counts_a_memory_exported_twice_once(sandbox: Sandbox) -> None:
    wat = """
    (module
      (memory 1)
      (export "memory" (memory 0)) (export "again" (memory 0))
      (func (export "_start") (drop (memory.grow (i32.const 3)))))
    """
    r = sandbox.run(Task.wasm(bytes(wasmtime.wat2wasm(wat))))
    assert r.metrics.peak_memory_bytes == 4 * WASM_PAGE
