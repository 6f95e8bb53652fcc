"""Task code runs as a real, fresh module on every tier (issue 12, item 1).

Python's own machinery looks a class's module up in ``sys.modules``: dataclasses, enum,
``typing.get_type_hints`` and pickle fail on code whose module is not there. The same tasks
run on the wasm tier (the runner built into the CPython component) and the container tier
(the runner file staged into the container); the runner itself is also driven in-process to
check that the module is fresh per task and gone afterwards.
"""

from __future__ import annotations

import linecache
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmbox import Result, Sandbox, Status, Task
from wasmbox.models import TierName
from wasmbox.runner import runner as guest_runner
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.wasm import WasmTier

DATACLASS = """\
import dataclasses

@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int = 2

def main(inp):
    return dataclasses.asdict(Point(inp["x"]))
"""

TYPE_HINTS = """\
from __future__ import annotations
import typing

class Node:
    value: int
    next: Node | None

def main(inp):
    hints = typing.get_type_hints(Node)
    return [hints["value"] is int, hints["next"] == typing.Optional[Node]]
"""

PICKLE_ENUM = """\
import enum, pickle

class Colour(enum.Enum):
    RED = 1

class Box:
    def __init__(self, value):
        self.value = value

def main(inp):
    box = pickle.loads(pickle.dumps(Box(Colour.RED)))
    return [box.value.name, type(box).__module__, __name__, Colour(1) is Colour.RED]
"""

SCRIPT = """\
import dataclasses, pickle, sys

@dataclasses.dataclass
class Point:
    x: int

if __name__ == "__main__":
    p = pickle.loads(pickle.dumps(Point(3)))
    print(p, sys.modules[__name__].Point is Point)
"""

RAISES = """\
def main(inp):
    helper()

def helper():
    raise ValueError("from the task")  # this line shows in the traceback
"""


Tiered = tuple[Sandbox, str]


@pytest.fixture(scope="module", params=["wasm", "container"])
def tier_sandbox(request: pytest.FixtureRequest, python_cache: Path) -> Iterator[Tiered]:
    """A sandbox and the tier name its Python tasks run on."""
    if request.param == "wasm":
        with Sandbox(tiers={TierName.WASM: lambda: WasmTier(python_cache)}) as sb:
            yield sb, "wasm"
        return
    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("neither crun nor runc is installed")
    with Sandbox(tiers={TierName.CONTAINER: ContainerTier}) as sb:
        availability = sb.availability(TierName.CONTAINER)
        if not availability.ok:
            pytest.skip(f"container tier unavailable: {availability.reason}")
        yield sb, "container"


def run(tier_sandbox: Tiered, source: str, **fields: object) -> Result:
    sandbox, tier = tier_sandbox
    result = sandbox.run(Task.python(source, tier=tier, **fields))
    assert result.tier == tier
    return result


def test_dataclass_in_task_code(tier_sandbox: Tiered) -> None:
    r = run(tier_sandbox, DATACLASS, input={"x": 1})
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == {"x": 1, "y": 2}


def test_type_hints_resolve_in_the_task_module(tier_sandbox: Tiered) -> None:
    r = run(tier_sandbox, TYPE_HINTS)
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == [True, True]


def test_task_classes_and_enums_pickle(tier_sandbox: Tiered) -> None:
    r = run(tier_sandbox, PICKLE_ENUM)
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == ["RED", "__task__", "__task__", True]


def test_main_guarded_script_is_a_real_main_module(tier_sandbox: Tiered) -> None:
    r = run(tier_sandbox, SCRIPT)
    assert r.status is Status.COMPLETED, r.stderr
    assert r.stdout == "Point(x=3) True\n"


def test_traceback_shows_the_task_s_source_lines(tier_sandbox: Tiered) -> None:
    r = run(tier_sandbox, RAISES)
    assert r.status is Status.FAILED
    assert 'raise ValueError("from the task")  # this line shows' in r.stderr
    assert "in helper" in r.stderr


# The runner itself, driven in-process: what a task leaves behind and what it sees.

def test_the_module_is_fresh_per_task_and_removed_after() -> None:
    main_before = sys.modules.get("__main__")
    first = "import sys\nMARK = 1\ndef main(inp):\n    return sys.modules[__name__].MARK\n"
    second = "def main(inp):\n    return 'MARK' in globals()\n"
    assert guest_runner.run_task(first, "<t1>") == (0, "1")
    assert "__task__" not in sys.modules and "<t1>" not in linecache.cache
    assert guest_runner.run_task(second, "<t2>") == (0, "false")
    script = "import sys\nassert sys.modules['__main__'].__dict__ is globals()\n"
    assert guest_runner.run_task(script, "<t3>") == (0, None)
    assert sys.modules.get("__main__") is main_before
    assert "<t3>" not in linecache.cache


def test_a_failing_task_is_removed_too() -> None:
    code, value = guest_runner.run_task("def main(inp):\n    raise KeyError(1)\n", "<t4>")
    assert (code, value) == (1, None)
    assert "__task__" not in sys.modules and "<t4>" not in linecache.cache
