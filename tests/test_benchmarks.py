"""Smoke test of the benchmark suite: it runs and writes its files. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.suite import main


def test_quick_suite_for_the_wasm_tier_writes_table_json_and_every_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick", "--tiers", "wasm", "--out", str(tmp_path)]) == 0
    # stderr is not a terminal here: no progress bar redraws (\r) go into logs
    assert "\r" not in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text().startswith("Measured")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "startup.png").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"meta", "claims", "rows"}
    assert {"machine", "loadavg_before", "loadavg_after", "mode"} <= set(data["meta"])
    rows = {row["id"]: row for row in data["rows"]}
    assert set(rows) == {"wasm", "native"}
    wasm = rows["wasm"]
    for key in ("startup_s", "cleanup_s", "exec_pairs", "memory_overhead_bytes", "throughput"):
        assert wasm[key], key
    assert set(wasm["summary"]) >= {"startup_s", "exec_ratio", "memory_overhead_bytes"}
