"""`shielded()`: Ctrl-C during cleanup waits until the cleanup is done."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from wasmbox.lifecycle import shielded


@pytest.fixture(autouse=True)
def _keep_sigint_handler() -> Iterator[None]:
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_inside_a_shield_is_raised_once_it_ends() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    finished: list[bool] = []

    def cleanup() -> None:
        with shielded():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes for the Python-level handler to run between
                pass
            finished.append(True)

    with pytest.raises(KeyboardInterrupt):
        cleanup()
    assert finished


@pytest.mark.parametrize("handler", [signal.SIG_IGN, signal.SIG_DFL, "function"])
def test_a_shield_gives_back_the_handler_it_found(handler: object) -> None:
    def custom(_signum: int, _frame: FrameType | None) -> None:
        pass

    found = custom if handler == "function" else handler
    signal.signal(signal.SIGINT, found)  # type: ignore[arg-type]
    with shielded():
        assert signal.getsignal(signal.SIGINT) is not found
    assert signal.getsignal(signal.SIGINT) == found
