"""Smoke test of the benchmark suite: it runs and writes its files. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

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


def test_peers_are_measured_side_by_side_and_an_absent_peer_is_a_row_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import bench_peers, report
    from benchmarks.common import NoProgress

    monkeypatch.setenv("WASMBOX_BENCH_LLM_WASM_SANDBOX_PYTHON", str(tmp_path / "no-python"))
    rows = bench_peers.measure(True, NoProgress(bench_peers.STEPS), only={
        "wasi-hello:wasmbox", "wasi-hello:wasmtime", "python-hello:llm-wasm-sandbox"})
    by_id = {row.id: row for row in rows}
    assert set(by_id) == {"wasi-hello:wasmbox", "wasi-hello:wasmtime",
                          "python-hello:llm-wasm-sandbox"}
    ours, floor = by_id["wasi-hello:wasmbox"], by_id["wasi-hello:wasmtime"]
    assert len(ours.wall_s) == len(floor.wall_s) > 0
    assert floor.compare_to == ours.id and floor.notes
    absent = by_id["python-hello:llm-wasm-sandbox"]
    assert not absent.available and absent.reason.startswith("not installed")
    table = "\n".join(report.peer_lines(rows))
    assert "wasmbox" in table and "not installed" in table


def test_every_kept_wasi_peer_sample_follows_a_run_of_the_same_side(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run straight after another library's costs several hundred µs, unequally per side:
    # no kept WASI sample may be one (each sample here is 1.0 if it followed another side).
    from benchmarks import bench_peers
    from benchmarks.common import NoProgress

    last: list[str] = [""]

    def fake(side_id: str) -> type[bench_peers.Side]:
        class Fake(bench_peers.Side):
            id = label = side_id

            def __init__(self, module: Path) -> None:
                pass

            def once(self) -> float:
                after_other = last[0] not in ("", side_id)
                last[0] = side_id
                return 1.0 if after_other else 0.0

        return Fake

    for name, side_id in (("WasmboxWasi", "wasmbox"), ("ExtismWasi", "extism"),
                          ("RawWasmtime", "wasmtime")):
        monkeypatch.setattr(bench_peers, name, fake(side_id))
    ids = {"wasi-hello:wasmbox", "wasi-hello:extism", "wasi-hello:wasmtime"}
    rows = bench_peers.measure(True, NoProgress(bench_peers.STEPS), only=ids)
    assert {row.id for row in rows} == ids
    for row in rows:
        assert len(row.wall_s) == 50 and set(row.wall_s) == {0.0}, row.id


def test_the_vm_sustained_run_reports_a_rare_guest_crash_and_stops_on_more() -> None:
    from benchmarks import bench_vm
    from wasmbox import Result, Status, Task
    from wasmbox.models import TierName

    def result(status: Status) -> Result:
        return Result(task_id="t", run_id="r", tier=TierName.VM, status=status,
                      reason="the guest stopped without reporting" if status.value == "crashed"
                      else None)

    class Runs:
        def __init__(self, statuses: list[Status]) -> None:
            self.statuses = statuses

        def run(self, task: Task) -> Result:
            return result(self.statuses.pop(0))

    ok, crashed = Status.COMPLETED, Status.CRASHED
    true = Task.command(["/bin/true"])
    once: Any = Runs([ok] * 3 + [ok, crashed] + [ok] * 8)  # 3 warm-up runs, then 10
    results = bench_vm._sequential(once, true, 10)
    assert [r.status for r in results].count(crashed) == 1
    assert "1 of 10 crashed (not timed): the guest stopped" in bench_vm._sequential_note(results)
    twice: Any = Runs([ok] * 3 + [crashed, crashed] + [ok] * 8)
    with pytest.raises(RuntimeError, match="crashed"):  # a second crash in ten stops the run
        bench_vm._sequential(twice, true, 10)


def test_the_scale_chart_draws_service_and_dask_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.common import Row
    from benchmarks.report import scale_chart, write

    rows = []
    for form in ("poll", "wait"):
        for level, rate in ((8, 200.0), (16, 210.0), (32, 230.0)):
            row = Row(f"service:{form}-{level}", f"{form} {level}", None, group="service")
            row.wall_s, row.throughput = [0.03, 0.04, 0.05], {"tasks_per_s": rate}
            rows.append(row)
    for width, rate in (("local", 500.0), ("1", 450.0), ("2", 800.0)):
        row = Row(f"dask:hello-{width}", f"hello {width}", None, group="scaling")
        row.throughput = {"tasks_per_s": rate}
        rows.append(row)
    meta = {"cores": 2, "started": "now", "mode": "quick", "duration_s": 1.0, "machine": {}}
    assert not [why for why in write(rows, meta, tmp_path) if "scale" in why]
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert scale_chart(rows[:0], tmp_path / "none.png") is not None  # nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_the_service_bench_runs_the_services_default_workers_unless_told() -> None:
    from benchmarks.bench_service import service_workers
    from wasmbox.service.config import ServiceSettings

    assert service_workers(None) == (ServiceSettings().workers, "the service's default")
    assert service_workers(2) == (2, "--workers")
