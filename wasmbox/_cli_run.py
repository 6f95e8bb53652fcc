"""Internal: ``wasmbox run`` — build a Task from the command line, run it, report it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wasmbox._cli_common import EXIT_GUEST_FAULT, EXIT_OK, UsageError
from wasmbox._cli_tools import python_state
from wasmbox.errors import InputRejected, ModuleRejected, SandboxError
from wasmbox.models import Policy, Resources, Result, Status, Task, TierName
from wasmbox.sandbox import Sandbox

WASM_MAGIC = b"\0asm"


def run(args: argparse.Namespace) -> int:
    """``wasmbox run``: the exit code says whether the task completed."""
    policy = Policy.from_toml(args.policy) if args.policy else Policy()
    try:
        resources = Resources(fuel=args.fuel, memory=args.memory, timeout=args.timeout)
    except ValidationError as exc:
        raise UsageError(f"run: {_first_error(exc)}") from None
    payload = _load_input(args)
    common: dict[str, Any] = {"input": payload, "resources": resources, "tier": TierName(args.tier)}
    task = _task(args, common)
    with Sandbox(policy) as sandbox:
        result = sandbox.run(task)
    if args.output is not None:
        write_files(result, args.output)
    if args.json:
        print(result.model_dump_json(indent=2, exclude={"files"}))
    else:
        _print_summary(result, args.output)
    return EXIT_OK if result.status is Status.COMPLETED else EXIT_GUEST_FAULT


def _task(args: argparse.Namespace, common: dict[str, Any]) -> Task:
    if args.command:
        if args.arg:
            raise UsageError("run: --arg is for wasm modules; put a command's arguments "
                             "after '--'")
        if common["tier"] is TierName.AUTO:
            common["tier"] = TierName.CONTAINER
        return Task.command(args.command, **common)
    code: Path = args.code
    if code.suffix == ".py":
        if args.arg:
            raise UsageError("run: --arg is not supported for Python tasks; pass data "
                             "through --input / --input-json")
        if not python_state()["built"] and sys.stderr.isatty():
            print("wasmbox: first Python task: building the interpreter (~40 s, once; "
                  "'wasmbox python build' does it ahead)", file=sys.stderr, flush=True)
        return Task.python(code, **common)
    try:
        with code.open("rb") as handle:
            magic = handle.read(len(WASM_MAGIC))
    except OSError as exc:
        raise ModuleRejected(f"cannot read {code}: {exc.strerror or exc}") from exc
    if magic != WASM_MAGIC:
        raise UsageError(f"run: {code} is neither a WebAssembly module (.wasm, starting with "
                         "\\0asm) nor Python source (.py); for a native program use "
                         "'wasmbox run -- CMD ARGS...'")
    return Task.wasm(code, args=tuple(args.arg), **common)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"


def _load_input(args: argparse.Namespace) -> Any:
    try:
        if args.input is not None:
            return json.loads(args.input.read_text(encoding="utf-8"))
        if args.input_json is not None:
            return json.loads(args.input_json)
    except (OSError, ValueError) as exc:
        raise InputRejected(f"cannot read the input: {exc}") from exc
    return None


def write_files(result: Result, directory: Path) -> None:
    """Write a result's output files under `directory`, refusing any path that leaves it."""
    root = directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in result.files.items():
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise SandboxError(f"refusing to write {rel!r} outside {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _print_summary(result: Result, output: Path | None) -> None:
    m = result.metrics
    if result.stdout:
        sys.stdout.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
    if result.stderr:
        sys.stderr.write(result.stderr)
    for warning in result.warnings:
        print(f"wasmbox: warning: {warning}", file=sys.stderr)
    line = f"status={result.status} tier={result.tier} exit_code={result.exit_code}"
    if result.reason:
        line += f" reason={result.reason!r}"
    print(line, file=sys.stderr)
    print(
        f"wall={m.wall_s * 1e3:.2f}ms startup={m.startup_s * 1e3:.2f}ms run={m.run_s * 1e3:.2f}ms"
        f" cleanup={m.cleanup_s * 1e3:.2f}ms fuel={m.fuel_consumed}"
        f" peak_memory={m.peak_memory_bytes}",
        file=sys.stderr,
    )
    if result.output is not None:
        print("result.json:", json.dumps(result.output), file=sys.stderr)
    if output is not None and result.files:
        print(f"{len(result.files)} output file(s) written to {output}", file=sys.stderr)
