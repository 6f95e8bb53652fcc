"""The guest-side Python runner, shipped inside the package for every tier.

``runner.py`` beside this file is never imported on the host: the container and VM tiers
copy its bytes into the sandbox and run it there, and the wasm tier builds it into the
CPython component, whose app imports it. One file thus holds the one rule for running
``main(input)`` everywhere.

Packages in the container and VM tiers: entry N of ``policy.python.packages`` is mounted
read-only at ``f"{PACKAGES_MOUNT}/{N}"`` and the runner is given `package_args` (one
``--path DIR`` each, in order) before its SOURCE_FILE; see ``runner.py``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

RUNNER_NAME = "runner.py"  # also the module name ``runner`` inside the wasm component
PACKAGES_MOUNT = "/opt/wasmbox/packages"  # entry N of python.packages: PACKAGES_MOUNT/N
PATH_OPTION = "--path"  # the runner's option putting one directory on sys.path


def package_mounts(count: int) -> list[str]:
    """The guest directories of the first `count` package entries, in order."""
    return [f"{PACKAGES_MOUNT}/{n}" for n in range(count)]


def package_args(count: int) -> list[str]:
    """The runner arguments (before SOURCE_FILE) putting `count` package mounts on sys.path."""
    return [arg for mount in package_mounts(count) for arg in (PATH_OPTION, mount)]


@functools.cache
def runner_source() -> bytes:
    """The runner's source, read once from the installed package (a wheel or a checkout)."""
    return resources.files(__name__).joinpath(RUNNER_NAME).read_bytes()


def runner_dir() -> Path:
    """The directory holding the runner on disk, for builders that take a path."""
    return Path(__file__).resolve().parent
