"""The guest side of Python tasks: packaged into a pre-initialised CPython component.

Nothing here runs on the host. ``app.py`` is built by componentize-py into a WebAssembly
component together with the CPython interpreter; its top-level imports decide which standard
library modules exist inside the guest. `WORLD` is the WIT interface between host and guest.
"""

WORLD_NAME = "task"

WORLD = """\
package wasmbox:python;

world task {
  /// code: 0 ok, 1 uncaught exception, 2 result not JSON, else the task's SystemExit code.
  /// value: main()'s return value as JSON. error: one line saying why the task failed.
  record verdict { code: s32, value: option<string>, error: option<string> }

  export run: func(
    source: string, filename: string, entry: string, input: string, paths: list<string>
  ) -> verdict;
}
"""
