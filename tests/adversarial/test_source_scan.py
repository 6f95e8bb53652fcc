"""Class 12: the host's scan of hostile Python source must not break the host.

Threat: with ``tier="auto"`` the host looks at a Python task's source to decide whether the
wasm interpreter can run it. ``ast.parse`` recurses on nesting, so source such as ``1+1+...``
(100,000 terms) or ``not not ... x`` raised RecursionError or MemoryError out of
`Sandbox.run`. The scan is now a flat token loop, bounded in size and time, and any failure of
it means "no opinion": the task runs, and whatever is wrong with the source is the task's own
outcome, never a host exception.
"""

from __future__ import annotations

import pytest

from wasmbox import Sandbox, Status, Task, apply
from wasmbox.models import TierName
from wasmbox.tiers.wasm.source_scan import MAX_SCAN_CHARS, imported_modules

NESTED = {
    "plus_chain": "x = " + "1+" * 100_000 + "1\n",
    "not_chain": "x = " + "not " * 100_000 + "True\n",
    "parens": "x = " + "(" * 50_000 + "1" + ")" * 50_000 + "\n",
    "lists": "x = " + "[" * 50_000 + "]" * 50_000 + "\n",
    "unary_minus": "x = " + "-" * 200_000 + "1\n",
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_scan_of_deeply_nested_source_never_raises(name: str) -> None:
    # With ast.parse in the scan, each of these raises RecursionError or MemoryError.
    assert imported_modules(NESTED[name] + "import zlib\n") in ({"zlib"}, None)


def test_scan_finds_static_imports_and_nothing_else() -> None:
    source = (
        "import os.path as p, json\n"
        "from collections import abc\n"
        "from . import sibling\n"
        "from .pkg import thing\n"
        "if True: import zlib; import lzma\n"
        "def g():\n"
        "    yield from range(3)\n"
        "    raise ValueError('x') from KeyError\n"
        "s = 'import not_a_module'\n"
        "# import commented\n"
        "from __future__ import annotations\n"
    )
    assert imported_modules(source) == {"os", "json", "collections", "zlib", "lzma",
                                        "__future__"}


def test_scan_gives_up_on_oversized_source() -> None:
    assert imported_modules("import zlib\n" + "#" * MAX_SCAN_CHARS) is None




@pytest.mark.parametrize("name", ["plus_chain", "not_chain"])
def test_nested_source_with_tier_auto_is_a_task_outcome(
    python_wasm_sandbox: Sandbox, name: str
) -> None:
    # Before the fix, Sandbox.run raised RecursionError from the host-side ast.parse.
    task = Task.python(NESTED[name], tier=TierName.AUTO, resources={"timeout": 30})
    r = python_wasm_sandbox.run(task)
    assert r.tier is TierName.WASM
    # Whatever the guest's own compiler makes of it (a result, a RecursionError, a
    # MemoryError), it is a status of the run, never a host exception.
    assert isinstance(r.status, Status)


def test_auto_still_sees_imports_after_the_change(python_wasm_sandbox: Sandbox) -> None:
    plan = apply(python_wasm_sandbox.policy, Task.python("import zlib\nimport no_such_mod_xyz\n"))
    tier = python_wasm_sandbox._tier(TierName.WASM)
    reason = tier.unsuitable(tier.prepare(plan))
    assert reason is not None and "no_such_mod_xyz" in reason
