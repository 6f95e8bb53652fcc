#!/usr/bin/env python3
"""Build the wasmbox guest programs (C sources -> wasm32-wasi modules).

Stdlib only; usable both as a script and as a module::

    python guests/build.py [--out build/guests] [--force] [names...]

    from guests.build import build
    paths = build(Path("build/guests"))          # {"hello": Path(".../hello.wasm"), ...}

Every ``*.c`` file under ``guests/examples``, ``guests/hostile`` and
``guests/kernels`` is one guest; the file stem is the guest name. Outputs are
rebuilt only when missing, older than their source or any header in
``guests/include``, or when ``force=True``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = GUESTS_DIR / "include"
GROUPS = ("examples", "hostile", "kernels")
WASM_TARGET = "--target=wasm32-wasi"
COMMON_FLAGS = ("-O2", "-Wl,--stack-first")
WARN_FLAGS = ("-Wall",)
MAX_WORKERS = 2
DEFAULT_OUT = Path("build") / "guests"

_PROBE_SOURCE = '#include <stdio.h>\nint main(void) { puts("probe"); return 0; }\n'


def sources() -> dict[str, Path]:
    """Map every guest name to its C source file."""
    found: dict[str, Path] = {}
    for group in GROUPS:
        for src in sorted((GUESTS_DIR / group).glob("*.c")):
            if src.stem in found:
                raise RuntimeError(
                    f"duplicate guest name {src.stem!r}: {found[src.stem]} and {src}"
                )
            found[src.stem] = src
    return found


def _headers() -> list[Path]:
    return sorted(INCLUDE_DIR.glob("*.h")) if INCLUDE_DIR.is_dir() else []


def _probe(cmd: Sequence[str]) -> str | None:
    """Test-compile a tiny program; return None on success, else an error text."""
    with tempfile.TemporaryDirectory(prefix="wasmbox-guest-probe-") as tmp:
        src = Path(tmp) / "probe.c"
        out = Path(tmp) / "probe.wasm"
        src.write_text(_PROBE_SOURCE)
        try:
            proc = subprocess.run(
                [*cmd, *COMMON_FLAGS, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if proc.returncode != 0:
            return proc.stderr.strip() or f"exit status {proc.returncode}"
        if not out.is_file() or out.read_bytes()[:4] != b"\0asm":
            return "compiler did not produce a wasm module"
    return None


@functools.cache
def _find_compiler() -> tuple[str, ...]:
    problems: list[str] = []
    clang = shutil.which("clang")
    if clang is None:
        problems.append("clang: not found on PATH")
    else:
        cmd = (clang, WASM_TARGET)
        err = _probe(cmd)
        if err is None:
            return cmd
        problems.append(f"clang {WASM_TARGET}: test compile failed: {err}")
    if importlib.util.find_spec("ziglang") is not None:
        return (sys.executable, "-m", "ziglang", "cc", WASM_TARGET)
    problems.append("ziglang: Python module not installed")
    raise RuntimeError(
        "no wasm32-wasi C compiler available. Either install clang with a wasi-libc "
        "sysroot (Debian: apt-get install clang lld wasi-libc libclang-rt-<N>-dev-wasm32), "
        "or `pip install ziglang` to use `python -m ziglang cc --target=wasm32-wasi`.\n"
        + "\n".join(f"  - {p}" for p in problems)
    )


def find_compiler() -> list[str]:
    """Return the wasm32-wasi C compiler command (without -O2/-o/sources).

    Prefers ``clang --target=wasm32-wasi`` when a test compile against the
    wasi-libc sysroot succeeds, falls back to ``python -m ziglang cc``, and
    raises :class:`RuntimeError` naming both options otherwise. The probe runs
    once per process.
    """
    return list(_find_compiler())


def _up_to_date(out: Path, deps: Iterable[Path]) -> bool:
    try:
        out_mtime = out.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(out_mtime > dep.stat().st_mtime_ns for dep in deps)


def _compile(cmd: Sequence[str], src: Path, out: Path) -> Path:
    """Compile into a temp file next to ``out`` and rename atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            [*cmd, "-o", str(tmp), str(src)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"compiling {src} failed (exit {proc.returncode}):\n"
                f"  $ {' '.join(cmd)} -o {out} {src}\n{proc.stderr}"
            )
        if proc.stderr.strip():
            sys.stderr.write(proc.stderr)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _select(names: Iterable[str] | None) -> dict[str, Path]:
    available = sources()
    if names is None:
        return available
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ValueError(
            f"unknown guest(s): {', '.join(unknown)}; available: {', '.join(sorted(available))}"
        )
    return {n: available[n] for n in wanted}


def build(
    out_dir: Path, names: Iterable[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Compile guests to ``out_dir/<name>.wasm`` and return ``{name: path}``.

    ``names=None`` builds every guest. Up-to-date outputs (newer than their
    source and every header in ``guests/include``) are skipped unless
    ``force``. Compiles run in parallel with two workers.
    """
    out_dir = Path(out_dir)
    selected = _select(names)
    headers = _headers()
    result = {name: out_dir / f"{name}.wasm" for name in selected}
    todo = [
        name
        for name, src in selected.items()
        if force or not _up_to_date(result[name], [src, *headers])
    ]
    if not todo:
        return result
    cmd = [*find_compiler(), *COMMON_FLAGS, *WARN_FLAGS, f"-I{INCLUDE_DIR}"]
    with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
        futures = [pool.submit(_compile, cmd, selected[name], result[name]) for name in todo]
        errors = [str(exc) for f in futures if (exc := f.exception()) is not None]
    if errors:
        raise RuntimeError("\n".join(errors))
    return result


def build_native(name: str, out_dir: Path) -> Path:
    """Compile guest ``name`` (normally a kernel) natively with ``cc -O2``.

    Returns ``out_dir/<name>`` (a host executable). Rebuilt only when stale.
    """
    src = _select([name])[name]
    cc = shutil.which("cc")
    if cc is None:
        raise RuntimeError("native build needs a C compiler: `cc` was not found on PATH")
    out = Path(out_dir) / name
    if _up_to_date(out, [src, *_headers()]):
        return out
    return _compile([cc, "-O2", *WARN_FLAGS, f"-I{INCLUDE_DIR}"], src, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build wasmbox guest programs to wasm32-wasi.")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--native", action="store_true", help="also build the named guests natively with cc -O2"
    )
    parser.add_argument("--list", action="store_true", help="list guest names and exit")
    parser.add_argument("names", nargs="*", help="guests to build (default: all)")
    args = parser.parse_args(argv)
    if args.list:
        for name, src in sources().items():
            print(f"{name}\t{src.relative_to(GUESTS_DIR)}")
        return 0
    names: list[str] | None = args.names or None
    try:
        built = build(args.out, names, force=args.force)
        for name, path in built.items():
            print(f"{name}: {path}")
        if args.native:
            for name in names or [n for n, s in sources().items() if s.parent.name == "kernels"]:
                print(f"{name} (native): {build_native(name, args.out / 'native')}")
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
