"""Internal: the ``wasmbox`` subcommands around running — doctor, python, bench, serve, vm."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wasmbox._cli_common import EXIT_HOST_ERROR, EXIT_OK
from wasmbox.models import Status, Task, TierName
from wasmbox.sandbox import Sandbox


def doctor(args: argparse.Namespace) -> int:
    """``wasmbox doctor``: which tiers work here, and the Python interpreter."""
    with Sandbox() as sandbox:
        report = sandbox.doctor()
    python = python_state()
    if args.json:
        entries: list[dict[str, Any]] = [
            {"tier": a.tier.value, "ok": a.ok, "reason": a.reason, "details": a.details}
            for a in report
        ]
        for entry in entries:
            if entry["tier"] == TierName.WASM.value:
                entry["details"] = {**entry["details"], "python_interpreter": python}
        print(json.dumps(entries, indent=2))
    else:
        for a in report:
            mark = "ok " if a.ok else "NO "
            details = " ".join(f"{k}={v}" for k, v in a.details.items())
            print(f"{mark} {a.tier.value:<10} {a.reason} {details}".rstrip())
        state = "built" if python["built"] else "not built yet ('wasmbox python build')"
        print(f"    python interpreter: {state}: {python['path']}")
    return EXIT_OK if report[0].ok else EXIT_HOST_ERROR


def python_state() -> dict[str, Any]:
    """Whether the Python interpreter is built, and where it is cached."""
    from wasmbox.tiers.wasm.cache import default_cache_dir
    from wasmbox.tiers.wasm.python import app_key

    path = default_cache_dir() / f"{app_key()}.wasm"
    return {"built": path.is_file(), "path": str(path)}


def python_status(args: argparse.Namespace) -> int:
    """``wasmbox python status``."""
    state = python_state()
    if args.json:
        print(json.dumps(state))
    elif state["built"]:
        print(f"built: {state['path']}")
    else:
        print(f"not built (the first Python task builds it, ~40 s; or run "
              f"'wasmbox python build'): {state['path']}")
    return EXIT_OK


def python_build(args: argparse.Namespace) -> int:
    """``wasmbox python build``: build and compile the interpreter ahead."""
    import time

    state = python_state()
    verb = "compiling" if state["built"] else "building (first time only, ~40 s)"
    print(f"wasmbox: {verb} the Python interpreter in {state['path']} ...", file=sys.stderr,
          flush=True)
    t0 = time.monotonic()
    with Sandbox() as sandbox:  # one trivial task builds, compiles and caches it
        result = sandbox.run(Task.python("def main(inp):\n    return inp", input={"ok": 1},
                                         tier=TierName.WASM))
    if result.status is not Status.COMPLETED:
        print(f"wasmbox: the interpreter does not run: {result.status} {result.reason or ''}"
              f"{result.stderr[-500:]}", file=sys.stderr)
        return EXIT_HOST_ERROR
    print(f"wasmbox: the Python interpreter is ready ({time.monotonic() - t0:.1f} s)",
          file=sys.stderr)
    return EXIT_OK


def bench(args: argparse.Namespace) -> int:
    """``wasmbox bench``: the benchmark suite of a source checkout."""
    # The suite lives in the repository's benchmarks/ (it compiles guests and native
    # baselines from guests/), so it runs from a checkout, not from an installed wheel.
    root = _checkout()
    if root is None:
        print("wasmbox bench: the benchmark suite is not part of the installed package; it "
              "needs a wasmbox source checkout (its benchmarks/ and guests/ directories). "
              "Run `wasmbox bench` from the repository root of a checkout.", file=sys.stderr)
        return EXIT_HOST_ERROR
    sys.path.insert(0, str(root))
    from benchmarks import suite

    code: int = suite.main(args.bench_args, prog="wasmbox bench")
    return code


def _checkout() -> Path | None:
    """The source checkout holding the benchmark suite: the current directory, else the one
    this package is imported from (an editable install); None for an installed wheel."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks" / "suite.py").is_file():
            return root
    return None


def serve(args: argparse.Namespace) -> int:
    """``wasmbox serve``: the HTTP service (the ``service`` extra)."""
    try:
        from wasmbox import service
    except ImportError as exc:
        print(f"wasmbox: the service needs the 'service' extra: {exc}", file=sys.stderr)
        return EXIT_HOST_ERROR
    return service.main(args.service_args)


def vm_assets(args: argparse.Namespace) -> int:
    """``wasmbox vm assets``: build the VM tier's kernel and root image."""
    try:
        from wasmbox.tiers.vm import assets
    except ModuleNotFoundError:
        print("wasmbox: the VM tier is not built in", file=sys.stderr)
        return EXIT_HOST_ERROR
    report = assets.prepare_assets(force=args.force)  # type: ignore[attr-defined,unused-ignore]
    print(report)
    return EXIT_OK
