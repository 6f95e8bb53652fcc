"""The README's API examples, type-checked by ``nox -s typecheck`` (mypy --strict), not run."""

from __future__ import annotations

from wasmbox import Resources, Sandbox, Task


def readme_examples(sb: Sandbox) -> None:
    sb.run(Task.wasm("build/guests/json_transform.wasm", input={"xs": [1, 2, 3]},
                     resources=Resources(memory="64M", timeout="2s")))
    sb.run(Task.python("def main(inp):\n    return {'sum': sum(inp['xs'])}", input={"xs": [1, 2]}))
    sb.run(Task.command(["/bin/sh", "-c", "wc -c /task/input.json"], input={"a": 1}))
    sb.run(Task.command(["/bin/echo", "hi"], tier="vm"))
