"""Command line: ``wasmbox run | doctor | bench | serve | vm assets``, built on the public API.

Exit codes, distinct from the guest's own exit code (which ``--json`` reports as ``exit_code``):
0 the task completed, 1 the task ended in any other status (failed, timeout, ...), 2 the command
line was wrong (an unknown option, ``--memory lots``), 3 the host refused or failed (a bad policy
file, rejected input, a tier that cannot run here), 130 interrupted.

Internal: the command is the interface; programs use the library through `wasmbox`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from wasmbox._cli_common import (
    EXIT_GUEST_FAULT,
    EXIT_HOST_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from wasmbox._cli_run import WASM_MAGIC, write_files
from wasmbox._cli_run import run as _run
from wasmbox._cli_tools import bench as _bench
from wasmbox._cli_tools import doctor as _doctor
from wasmbox._cli_tools import python_build as _python_build
from wasmbox._cli_tools import python_status as _python_status
from wasmbox._cli_tools import serve as _serve
from wasmbox._cli_tools import vm_assets as _vm_assets
from wasmbox.errors import SandboxError
from wasmbox.models import TierName, parse_duration, parse_size

__all__ = [
    "EXIT_GUEST_FAULT", "EXIT_HOST_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE",
    "WASM_MAGIC", "UsageError", "main", "write_files",
]


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


if __name__ == "__main__":
    sys.exit(main())
