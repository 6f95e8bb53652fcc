"""The epoch ticker ticks only while a guest runs, and a parked ticker still stops guests."""

from __future__ import annotations

import time
from pathlib import Path

from wasmbox import Resources, Sandbox, Status, Task
from wasmbox.models import TierName
from wasmbox.tiers.wasm.engine import TICK_SECONDS
from wasmbox.tiers.wasm.tier import WasmTier

SETTLE_S = 20 * TICK_SECONDS  # the one tick the loop may take after the last store is gone


def _idle_ticks(ticker: object) -> tuple[int, int]:
    """The ticker's count after it settled, and again 40 periods later."""
    time.sleep(SETTLE_S)
    before: int = ticker.ticks  # type: ignore[attr-defined]
    time.sleep(40 * TICK_SECONDS)
    return before, ticker.ticks  # type: ignore[attr-defined]


def test_the_ticker_parks_when_idle_and_a_later_guest_still_times_out(
    sandbox: Sandbox, guests: dict[str, Path]
) -> None:
    assert sandbox.run(Task.wasm(guests["hello"])).status is Status.COMPLETED
    tier = sandbox._tiers[TierName.WASM]
    assert isinstance(tier, WasmTier)
    [(handle, _)] = tier._engines.values()
    ticker = handle._ticker
    before, after = _idle_ticks(ticker)
    assert after == before, "the ticker ticked with no guest running"

    r = sandbox.run(Task.wasm(guests["infinite_loop"],
                              resources=Resources(timeout="200ms", fuel=10**10)))
    assert r.status is Status.TIMEOUT
    assert r.reason == "wall-clock deadline passed"
    assert ticker.ticks > after  # woken for the guest: the deadline is checked on each tick
    assert 0.2 <= r.metrics.wall_s < 5

    before, after = _idle_ticks(ticker)
    assert after == before, "the ticker kept ticking after the guest ended"
