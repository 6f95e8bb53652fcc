"""Command line: ``wasmbox run | doctor | vm assets``, built on the public API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wasmbox.errors import SandboxError
from wasmbox.models import Policy, Resources, Result, Status, Task, TierName, parse_duration
from wasmbox.sandbox import Sandbox

EXIT_OK, EXIT_GUEST_FAULT, EXIT_HOST_ERROR = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wasmbox`` command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if argv[:1] == ["serve"]:  # the service and the suite parse their own options
        args = argparse.Namespace(handler=_serve, service_args=argv[1:])
    elif argv[:1] == ["bench"]:
        args = argparse.Namespace(handler=_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except SandboxError as exc:
        print(f"wasmbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_HOST_ERROR
    except KeyboardInterrupt:
        print("wasmbox: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasmbox", description="Run untrusted tasks in sandboxes."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one task (a .wasm module or a .py file)")
    run.add_argument("code", type=Path, help="a WASI module (.wasm) or Python source (.py)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="JSON file staged as /task/input.json")
    source.add_argument("--input-json", help="the input as a JSON string")
    run.add_argument("--output", type=Path, help="directory to write /task/output files into")
    run.add_argument("--policy", type=Path, help="policy TOML file")
    run.add_argument("--fuel", type=int, help="CPU budget in wasm fuel units")
    run.add_argument("--memory", help="memory cap, e.g. 64M")
    run.add_argument("--timeout", help="wall-clock limit, e.g. 5s or 250ms")
    run.add_argument("--tier", choices=[t.value for t in TierName], default="auto")
    run.add_argument("--arg", action="append", default=[], help="argument for the task (repeat)")
    run.add_argument("--json", action="store_true", help="print the whole Result as JSON")
    run.set_defaults(handler=_run)

    doctor = sub.add_parser("doctor", help="which tiers work on this host, and why not")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(handler=_doctor)

    bench = sub.add_parser("bench", help="the benchmark suite (run from the repository root)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)

    serve = sub.add_parser("serve", help="the HTTP task service (see --help)", add_help=False)
    serve.add_argument("service_args", nargs=argparse.REMAINDER)
    serve.set_defaults(handler=_serve)

    vm = sub.add_parser("vm", help="VM tier utilities")
    vm_sub = vm.add_subparsers(required=True, metavar="ACTION")
    assets = vm_sub.add_parser("assets", help="download and build the VM kernel and initramfs")
    assets.add_argument("--force", action="store_true")
    assets.set_defaults(handler=_vm_assets)
    return parser


def _run(args: argparse.Namespace) -> int:
    policy = Policy.from_toml(args.policy) if args.policy else Policy()
    resources = Resources(
        fuel=args.fuel,
        memory=args.memory,
        timeout=parse_duration(args.timeout) if args.timeout else None,
    )
    payload = _load_input(args)
    common: dict[str, Any] = {"input": payload, "resources": resources, "tier": TierName(args.tier)}
    if args.code.suffix == ".py":
        task = Task.python(args.code, **common)
    else:
        task = Task.wasm(args.code, args=tuple(args.arg), **common)
    with Sandbox(policy) as sandbox:
        result = sandbox.run(task)
    if args.output is not None:
        write_files(result, args.output)
    if args.json:
        print(result.model_dump_json(indent=2, exclude={"files"}))
    else:
        _print_summary(result, args.output)
    return EXIT_OK if result.status is Status.COMPLETED else EXIT_GUEST_FAULT


def _load_input(args: argparse.Namespace) -> Any:
    try:
        if args.input is not None:
            return json.loads(args.input.read_text(encoding="utf-8"))
        if args.input_json is not None:
            return json.loads(args.input_json)
    except (OSError, ValueError) as exc:
        from wasmbox.errors import InputRejected

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
    if args.json:
        print(json.dumps([
            {"tier": a.tier.value, "ok": a.ok, "reason": a.reason, "details": a.details}
            for a in report
        ], indent=2))
    else:
        for a in report:
            mark = "ok " if a.ok else "NO "
            details = " ".join(f"{k}={v}" for k, v in a.details.items())
            print(f"{mark} {a.tier.value:<10} {a.reason} {details}".rstrip())
    return EXIT_OK if report[0].ok else EXIT_HOST_ERROR


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

    code: int = suite.main(args.bench_args)
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
