#!/usr/bin/env python3
"""Build the native guests (C sources -> static x86-64 executables) for the container tier.

Stdlib only; usable as a script or a module::

    python3 guests/native/build.py [--out build/native]

    from guests.native.build import build_native
    paths = build_native(Path("build/native"))   # {"fork_bomb": Path(".../fork_bomb"), ...}

Every ``*.c`` under ``guests/native/examples`` and ``guests/native/hostile`` is one program,
named by its stem. Programs are linked ``-static`` where the C library allows it (so they run
in any root), dynamically otherwise; an output newer than its source is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
GROUPS = ("examples", "hostile")
DEFAULT_OUT = Path("build") / "native"
FLAGS = ("-O2", "-Wall")


def sources() -> dict[str, Path]:
    """Map every native guest name to its C source."""
    found: dict[str, Path] = {}
    for group in GROUPS:
        for src in sorted((NATIVE_DIR / group).glob("*.c")):
            if src.stem in found:
                raise RuntimeError(f"duplicate native guest {src.stem!r}")
            found[src.stem] = src
    return found


def compiler() -> str:
    """The C compiler: ``$CC``, else cc, gcc or clang; raises RuntimeError if none exists."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")


def build_native(out_dir: Path | str = DEFAULT_OUT, force: bool = False) -> dict[str, Path]:
    """Compile every native guest into `out_dir`; returns name -> executable path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = compiler()
    built: dict[str, Path] = {}
    for name, src in sources().items():
        target = out / name
        if force or not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
            _compile(cc, src, target)
        built[name] = target
    return built


def _compile(cc: str, src: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        for extra in (("-static",), ()):
            proc = subprocess.run(
                [cc, *FLAGS, *extra, "-o", str(tmp), str(src)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"cannot compile {src}:\n{proc.stderr}")
        tmp.chmod(0o755)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for name, path in build_native(args.out, args.force).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
