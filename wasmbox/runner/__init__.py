"""The guest-side Python runner, shipped inside the package for every tier.

``runner.py`` beside this file is never imported on the host: the container and VM tiers
copy its bytes into the sandbox and run it there, and the wasm tier builds it into the
CPython component, whose app imports it. One file thus holds the one rule for running
``main(input)`` everywhere.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

RUNNER_NAME = "runner.py"  # also the module name ``runner`` inside the wasm component


@functools.cache
def runner_source() -> bytes:
    """The runner's source, read once from the installed package (a wheel or a checkout)."""
    return resources.files(__name__).joinpath(RUNNER_NAME).read_bytes()


def runner_dir() -> Path:
    """The directory holding the runner on disk, for builders that take a path."""
    return Path(__file__).resolve().parent
