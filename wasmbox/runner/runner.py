"""Guest-side runner for Python tasks: runs INSIDE the sandbox, never on the host.

One copy serves every tier. The container and VM tiers run it as a script,
``python3 -I runner.py [--path DIR]... SOURCE_FILE [ENTRY]``: it reads ``/task/input.json``
and writes the result to ``/task/output/result.json``.

Packages (``policy.python.packages``), the convention shared by the container and VM tiers:
entry N of the list is mounted read-only at ``/opt/wasmbox/packages/N``
(``wasmbox.runner.PACKAGES_MOUNT``) and passed as ``--path /opt/wasmbox/packages/N``
(``wasmbox.runner.package_args``), in list order. Not ``PYTHONPATH``: the runner runs under
``-I``, which ignores it, and a task's own environment cannot then add to or reorder the
path. The directories go on ``sys.path`` after the standard library and before any
site-packages of the sandbox's ``python3``, so a listed package wins over one the image
happens to ship, and none shadows the standard library (as in the wasm tier).

The wasm tier's component imports it as ``runner`` and calls `run_task`, passing the input
and the result as strings.

The rule (`run_task`): a source that defines ENTRY (default ``main``) at top level runs as
module ``__task__`` and ``ENTRY(input)`` is called; its return value is the result, as JSON.
Any other source runs as ``__main__``, a script, and writes nothing itself. The task is a
real module, fresh per task: while it runs it is in ``sys.modules`` under its ``__name__``
(so dataclasses, ``typing.get_type_hints``, ``pickle`` and ``enum`` find it) and its source is
in ``linecache`` (tracebacks show its lines); both are removed afterwards. An uncaught
exception prints its traceback to stderr (code 1); a return value that is not JSON is code 2;
``SystemExit`` gives its own code.

Only standard library modules the wasm component snapshots may be imported here.
"""

from __future__ import annotations

import json
import linecache
import sys
import traceback
import types

INPUT = "/task/input.json"
RESULT = "/task/output/result.json"
PATH_OPTION = "--path"  # equals wasmbox.runner.PATH_OPTION (this file cannot import it)
USAGE = "usage: runner.py [--path DIR]... SOURCE_FILE [ENTRY]"


def run_task(source: str, filename: str, entry: str = "main",
             payload: object = None) -> tuple[int, str | None]:
    """Run one task: (exit code, the result as JSON text or None)."""
    cached = linecache.cache.get(filename)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        code = compile(source, filename, "exec")
        # A module-level `def entry` both stores the name and carries the function's code as
        # a constant: read from the bytecode, which costs nothing, rather than an AST.
        defines_entry = entry in code.co_names and any(
            isinstance(const, types.CodeType) and const.co_name == entry
            for const in code.co_consts
        )
        module = types.ModuleType("__task__" if defines_entry else "__main__")
        module.__file__ = filename
        value = _run_registered(module, code, entry if defines_entry else None, payload)
        if not defines_entry:
            return 0, None
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None
    except BaseException:
        traceback.print_exc()
        return 1, None
    finally:
        if cached is None:
            linecache.cache.pop(filename, None)
        else:
            linecache.cache[filename] = cached
    try:
        data = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        print(f"wasmbox: {entry}() returned a value that is not JSON: {exc}", file=sys.stderr)
        return 2, None
    return 0, data


def _run_registered(module: types.ModuleType, code: types.CodeType, entry: str | None,
                    payload: object) -> object:
    """Execute `code` as `module`, in ``sys.modules`` meanwhile; call `entry` if given."""
    name = module.__name__
    previous = sys.modules.get(name)  # the runner itself is ``__main__`` when run as a script
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
        return None if entry is None else module.__dict__[entry](payload)
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


def add_paths(paths: list[str]) -> None:
    """Put package directories on ``sys.path`` after the standard library, before the first
    site-packages (or dist-packages) entry, in order."""
    at = next((i for i, p in enumerate(sys.path)
               if p.rstrip("/").endswith(("site-packages", "dist-packages"))), len(sys.path))
    sys.path[at:at] = [p for p in paths if p not in sys.path]


def main(argv: list[str]) -> int:
    """Script entry: run SOURCE_FILE against the task's files; returns the exit code."""
    args = argv[1:]
    paths: list[str] = []
    while len(args) >= 2 and args[0] == PATH_OPTION:
        paths.append(args[1])
        args = args[2:]
    if not args or args[0] == PATH_OPTION:
        print(USAGE, file=sys.stderr)
        return 64
    add_paths(paths)
    argv = [argv[0], *args]
    with open(argv[1], encoding="utf-8") as f:
        source = f.read()
    try:
        with open(INPUT, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        payload = None
    code, data = run_task(source, argv[1], argv[2] if len(argv) > 2 else "main", payload)
    if data is not None:
        with open(RESULT, "w", encoding="utf-8") as f:
            f.write(data)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
