"""Command line: ``wasmbox run | doctor | bench | serve | vm assets``, built on the public API.

Exit codes, distinct from the guest's own exit code (which ``--json`` reports as ``exit_code``):
0 the task completed, 1 the task ended in any other status (failed, timeout, ...), 2 the command
line was wrong (an unknown option, ``--memory lots``), 3 the host refused or failed (a bad policy
file, rejected input, a tier that cannot run here), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from wasmbox.errors import InputRejected, ModuleRejected, SandboxError
from wasmbox.models import (
    Policy,
    Resources,
    Result,
    Status,
    Task,
    TierName,
    parse_duration,
    parse_size,
)
from wasmbox.sandbox import Sandbox

EXIT_OK, EXIT_GUEST_FAULT, EXIT_USAGE, EXIT_HOST_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
WASM_MAGIC = b"\0asm"


class UsageError(Exception):
    """The command line itself is wrong (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wasmbox`` command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(argv)
    try:
        args = _parse(argv, as_json)
        code: int = args.handler(args)
        return code
    except UsageError as exc:
        return _fail(as_json, EXIT_USAGE, "UsageError", str(exc))
    except SandboxError as exc:
        return _fail(as_json, EXIT_HOST_ERROR, type(exc).__name__, str(exc))
    except KeyboardInterrupt:
        return _fail(as_json, EXIT_INTERRUPTED, "KeyboardInterrupt", "interrupted")


def _wants_json(argv: list[str]) -> bool:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return bool(head[:1] == ["run"] or head[:1] == ["doctor"]) and "--json" in head


def _fail(as_json: bool, code: int, kind: str, message: str) -> int:
    if as_json:
        print(json.dumps({"error": kind, "message": message, "exit_code": code}))
    else:
        print(f"wasmbox: {kind}: {message}" if kind != "UsageError" else f"wasmbox: {message}",
              file=sys.stderr)
    return code


def _parse(argv: list[str], as_json: bool) -> argparse.Namespace:
    if argv[:1] == ["serve"]:  # the service and the suite parse their own options
        return argparse.Namespace(handler=_serve, service_args=argv[1:])
    if argv[:1] == ["bench"]:
        return argparse.Namespace(handler=_bench, bench_args=argv[1:])
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # wasmbox run [options] -- CMD ARGS...
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
        if not command:
            raise UsageError("run: nothing after '--' (expected a command and its arguments)")
    args = _parser(as_json).parse_args(argv)
    if getattr(args, "handler", None) is _run:
        args.command = command
        if command and args.code is not None:
            raise UsageError("run: give either CODE or '-- CMD ARGS...', not both")
        if not command and args.code is None:
            raise UsageError("run: expected CODE (a .wasm or .py file) or '-- CMD ARGS...'")
    return args


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), JSON errors under ``--json``."""

    as_json = False

    def error(self, message: str) -> NoReturn:
        if self.as_json:
            print(json.dumps({"error": "UsageError", "message": f"{self.prog}: {message}",
                              "exit_code": EXIT_USAGE}))
        else:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _converter(name: str, parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _positive_size(text: str) -> int:
    value = int(parse_size(text))
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return value


def _positive_duration(text: str) -> float:
    value = float(parse_duration(text))
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def _fuel(text: str) -> int:
    cleaned = text.replace("_", "")
    try:
        value = int(cleaned)
    except ValueError:
        number = float(cleaned)  # "1e9": accepted when it names a whole number
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"not a whole number of fuel units: {text!r}") from None
        value = int(number)
    if value <= 0:
        raise ValueError(f"fuel must be positive: {text!r}")
    return value


def _version() -> str:
    try:
        return metadata.version("wasmbox")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser(as_json: bool = False) -> argparse.ArgumentParser:
    _Parser.as_json = as_json
    parser = _Parser(
        prog="wasmbox", description="Run untrusted tasks in sandboxes.",
        epilog="exit codes: 0 completed, 1 the task did not complete (its status says why), "
               "2 usage error, 3 host error, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"wasmbox {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run", help="run one task: a .wasm module, a .py file, or -- CMD ARGS...",
        usage="wasmbox run [options] CODE\n       wasmbox run [options] -- CMD [ARGS...]",
        description="Run one task. CODE is a WASI module (.wasm) or Python source (.py); after "
                    "'--' a native command runs in the container tier (or --tier vm).",
    )
    run.add_argument("code", type=Path, nargs="?",
                     help="a WASI module (.wasm) or Python source (.py)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, metavar="FILE",
                        help="JSON file staged as /task/input.json")
    source.add_argument("--input-json", metavar="JSON", help="the input as a JSON string")
    run.add_argument("--output", type=Path, metavar="DIR",
                     help="directory to write /task/output files into")
    run.add_argument("--policy", type=Path, metavar="FILE", help="policy TOML file")
    run.add_argument("--fuel", type=_converter("fuel", _fuel), metavar="N",
                     help="CPU budget in wasm fuel units, e.g. 100000000 or 1e8")
    run.add_argument("--memory", type=_converter("size", _positive_size), metavar="SIZE",
                     help="memory cap, e.g. 64M or 64MiB")
    run.add_argument("--timeout", type=_converter("duration", _positive_duration),
                     metavar="DURATION", help="wall-clock limit, e.g. 5s or 250ms")
    run.add_argument("--tier", choices=[t.value for t in TierName], default="auto",
                     help="where to run (default: auto, the lightest tier that can)")
    run.add_argument("--arg", action="append", default=[], metavar="ARG",
                     help="argument for a wasm task's argv (repeat); for native commands put "
                          "arguments after '--'")
    run.add_argument("--json", action="store_true",
                     help="print the whole Result (or the error) as JSON on stdout")
    run.set_defaults(handler=_run)

    doctor = sub.add_parser("doctor", help="which tiers work on this host, and why not",
                            description="Which tiers work on this host, and why not.")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(handler=_doctor)

    bench = sub.add_parser("bench", help="the benchmark suite (from a repository checkout; "
                                         "wasmbox bench --help)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)

    serve = sub.add_parser("serve", help="the HTTP task service (wasmbox serve --help)",
                           add_help=False)
    serve.add_argument("service_args", nargs=argparse.REMAINDER)
    serve.set_defaults(handler=_serve)

    python = sub.add_parser("python", help="the CPython-for-WASI interpreter of the wasm tier",
                            description="The CPython-for-WASI interpreter of the wasm tier.")
    py_sub = python.add_subparsers(required=True, metavar="ACTION", parser_class=_Parser)
    py_build = py_sub.add_parser("build", help="build and compile it now (first use: ~40 s)",
                                 description="Build and compile the interpreter ahead of the "
                                             "first Python task.")
    py_build.set_defaults(handler=_python_build)
    py_status = py_sub.add_parser("status", help="whether it is built, and where",
                                  description="Whether the interpreter is built, and where.")
    py_status.add_argument("--json", action="store_true", help="print the state as JSON")
    py_status.set_defaults(handler=_python_status)

    vm = sub.add_parser("vm", help="VM tier utilities", description="VM tier utilities.")
    vm_sub = vm.add_subparsers(required=True, metavar="ACTION", parser_class=_Parser)
    assets = vm_sub.add_parser("assets", help="download and build the VM kernel and initramfs",
                               description="Download the VM kernel and build the initramfs.")
    assets.add_argument("--force", action="store_true", help="rebuild even if up to date")
    assets.set_defaults(handler=_vm_assets)
    return parser


def _run(args: argparse.Namespace) -> int:
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
        if not _python_state()["built"] and sys.stderr.isatty():
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


def _doctor(args: argparse.Namespace) -> int:
    with Sandbox() as sandbox:
        report = sandbox.doctor()
    python = _python_state()
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


def _python_state() -> dict[str, Any]:
    from wasmbox.tiers.wasm.cache import default_cache_dir
    from wasmbox.tiers.wasm.python import app_key

    path = default_cache_dir() / f"{app_key()}.wasm"
    return {"built": path.is_file(), "path": str(path)}


def _python_status(args: argparse.Namespace) -> int:
    state = _python_state()
    if args.json:
        print(json.dumps(state))
    elif state["built"]:
        print(f"built: {state['path']}")
    else:
        print(f"not built (the first Python task builds it, ~40 s; or run "
              f"'wasmbox python build'): {state['path']}")
    return EXIT_OK


def _python_build(args: argparse.Namespace) -> int:
    import time

    state = _python_state()
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


def _bench(args: argparse.Namespace) -> int:
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


def _serve(args: argparse.Namespace) -> int:
    try:
        from wasmbox import service
    except ImportError as exc:
        print(f"wasmbox: the service needs the 'service' extra: {exc}", file=sys.stderr)
        return EXIT_HOST_ERROR
    return service.main(args.service_args)


def _vm_assets(args: argparse.Namespace) -> int:
    try:
        from wasmbox.tiers.vm import assets
    except ModuleNotFoundError:
        print("wasmbox: the VM tier is not built in", file=sys.stderr)
        return EXIT_HOST_ERROR
    report = assets.prepare_assets(force=args.force)  # type: ignore[attr-defined,unused-ignore]
    print(report)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
