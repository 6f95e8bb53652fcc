"""Detecting a hang that holds the GIL (a backtracking regex cannot be interrupted in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def finishes(code: str, within: float = 60.0) -> str:
    """Run `code` in a fresh interpreter and return its stdout; fail the test if it hangs.

    The bound only tells a hang (2**64 backtracking steps) from an answer: it is generous and
    asserts nothing about speed.
    """
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=within, env={**os.environ, "PYTHONPATH": path},
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {within} s: catastrophic backtracking?")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
