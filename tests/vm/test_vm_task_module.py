"""Task code runs as a real, fresh module in the VM tier too (issue 12, item 1).

The same tasks as ``tests/python/test_task_module.py`` (dataclasses, ``get_type_hints``,
pickle of task classes and enums, a ``__main__`` script, tracebacks with the task's lines),
collected here again so they run on the VM tier's sandbox.
"""

from __future__ import annotations

import pytest

from tests.python.test_task_module import (
    Tiered,
    test_dataclass_in_task_code,
    test_main_guarded_script_is_a_real_main_module,
    test_task_classes_and_enums_pickle,
    test_traceback_shows_the_task_s_source_lines,
    test_type_hints_resolve_in_the_task_module,
)
from wasmbox import Sandbox

__all__ = [
    "test_dataclass_in_task_code",
    "test_main_guarded_script_is_a_real_main_module",
    "test_task_classes_and_enums_pickle",
    "test_traceback_shows_the_task_s_source_lines",
    "test_type_hints_resolve_in_the_task_module",
]


@pytest.fixture
def tier_sandbox(vm_sandbox: Sandbox) -> Tiered:
    """The session's VM sandbox, for the shared tests' ``run`` helper."""
    return vm_sandbox, "vm"
