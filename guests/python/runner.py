"""Guest-side runner for Python tasks: runs INSIDE the sandbox, never on the host.

Usage (inside the guest): ``python3 runner.py SOURCE_FILE [ENTRY]``

Loads the task source as module ``__task__``. If it defines ENTRY (default ``main``), calls
``ENTRY(input)`` with the parsed ``/task/input.json`` and writes the return value as JSON to
``/task/output/result.json``. A script without ENTRY runs as ``__main__`` and writes nothing
itself. An uncaught exception prints its traceback to stderr and exits 1; a return value that
is not JSON-serialisable exits 2.
"""

from __future__ import annotations

import json
import sys
import traceback
import types

INPUT = "/task/input.json"
RESULT = "/task/output/result.json"


def run_source(source: str, filename: str, entry: str = "main") -> int:
    """Run one task; returns the process exit code."""
    try:
        with open(INPUT, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        payload = None
    module = types.ModuleType("__task__")
    module.__file__ = filename
    try:
        code = compile(source, filename, "exec")
        # A module-level `def entry` both stores the name and carries the function's code as
        # a constant: read from the bytecode, which costs nothing, rather than an AST.
        defines_entry = entry in code.co_names and any(
            isinstance(const, types.CodeType) and const.co_name == entry
            for const in code.co_consts
        )
        namespace = module.__dict__
        if not defines_entry:
            namespace["__name__"] = "__main__"
        exec(code, namespace)
        if not defines_entry:
            return 0
        value = namespace[entry](payload)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    try:
        data = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        print(f"wasmbox: {entry}() returned a value that is not JSON: {exc}", file=sys.stderr)
        return 2
    with open(RESULT, "w", encoding="utf-8") as f:
        f.write(data)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: runner.py SOURCE_FILE [ENTRY]", file=sys.stderr)
        return 64
    with open(argv[1], encoding="utf-8") as f:
        source = f.read()
    return run_source(source, argv[1], argv[2] if len(argv) > 2 else "main")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
