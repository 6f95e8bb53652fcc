"""Sessions: demo, tests, lint, typecheck, guests, bench. ``nox -s tests`` is the test command."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


def _system_deps(session: nox.Session) -> None:
    session.run("bash", ".ci/install-system-deps", external=True)


def _install(session: nox.Session, *extras: str) -> None:
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Build the example guests and run one in the default (wasm) tier."""
    _system_deps(session)
    _install(session)
    session.run("python", "guests/build.py", "--out", "build/guests", "hello", "json_transform")
    session.run(
        "wasmbox", "run", "build/guests/json_transform.wasm",
        "--input-json", '{"xs": [3, 1, 4, 1, 5, 9, 2, 6]}', "--output", "build/demo-output",
    )


@nox.session(python=PYTHON)
def guests(session: nox.Session) -> None:
    """Compile every guest under guests/ to build/guests."""
    _system_deps(session)
    session.run("python", "guests/build.py", "--out", "build/guests", *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (slow soaks excluded; pass -- -m slow to run them)."""
    _system_deps(session)
    _install(session, "test")
    session.run("python", "guests/build.py", "--out", "build/guests")
    session.run("wasmbox", "python", "build")  # the ~40 s first build, once, up front
    args = session.posargs or ["-m", "not slow", "-q"]
    session.run("pytest", *args, env={"PYTHONFAULTHANDLER": "1", **_passthrough()})


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """10,000 mixed tasks across every available tier: flat RSS, nothing leaked."""
    _system_deps(session)
    _install(session, "test")
    session.run("python", "guests/build.py", "--out", "build/guests")
    session.run("pytest", "-m", "slow", "-q", "tests/test_soak.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over everything."""
    session.install("ruff")
    session.run("ruff", "check", "wasmbox", "tests", "benchmarks", "guests", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the guest build script."""
    _install(session, "dev", "test", "bench")
    session.run("mypy", "--strict", "wasmbox")
    session.run("mypy", "--strict", "tests/typing")  # the README's API examples type-check
    # Separately: the editable install puts the repo root on the path, where guests/ is also
    # importable as a namespace package, and one mypy run would see build.py twice.
    session.run("mypy", "--strict", "guests/build.py")
    session.run("mypy", "--strict", "guests/native/build.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark suite: the tier table (quick unless ``-- --full``; ``-- --publish``)."""
    _system_deps(session)
    _install(session, "bench")
    session.run("python", "guests/build.py", "--out", "build/guests")
    session.run("python", "-m", "benchmarks", *session.posargs)


def _passthrough() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("WASMBOX_")}
