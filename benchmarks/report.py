"""Turning rows of samples into the published table, the JSON record and the startup chart."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import NoProgress, Progress, Row, median, p95, summary

# The seed document's table (sandboxed_execution_environments.md), by the row it names.
CLAIMS: dict[str, dict[str, str]] = {
    "container": {"startup": "1-3 s", "exec": "5-10%", "memory": "10-20 MB",
                  "cleanup": "0.5-1 s"},
    "VM": {"startup": "5-15 s", "exec": "10-20%", "memory": "50-100 MB", "cleanup": "1-3 s"},
    "language runtime": {"startup": "0.1-0.5 s", "exec": "1-5%", "memory": "5-10 MB",
                         "cleanup": "0.1-0.3 s"},
}
# Seed startup ranges in seconds, drawn behind our bars.
CLAIM_STARTUP_S = {"container": (1.0, 3.0), "VM": (5.0, 15.0), "language runtime": (0.1, 0.5)}


def summarise(row: Row) -> dict[str, Any]:
    """Medians and p95s of every measure of one row."""
    ratios = [p.cpu_ratio for p in row.exec_pairs]
    return {
        "startup_s": summary(row.startup_s),
        "wall_s": summary(row.wall_s),
        "cleanup_s": summary(row.cleanup_s),
        "exec_ratio": summary(ratios),
        "memory_overhead_bytes": summary(row.memory_overhead_bytes),
        "tasks_per_s": row.throughput.get("tasks_per_s"),
        "rates": summary(row.rates),
    }


def record(rows: Sequence[Row], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: machine facts, the seed's claims, and every row with its samples."""
    return {
        "meta": meta,
        "claims": CLAIMS,
        "rows": [{**row.as_json(), "summary": summarise(row)} for row in rows],
    }


def markdown(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The seed-shaped table (ours beside the seed's claim), definitions and machine facts."""
    head = ("| Tier | Startup | Execution overhead | Memory overhead | Cleanup "
            f"| Tasks/s ({meta['cores']} cores) | Trivial task end to end |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    absent = []
    grouped = [row for row in rows if row.group]
    rows = [row for row in rows if not row.group]
    for row in rows:
        claim = CLAIMS.get(row.claim or "", {})
        if not row.available:
            lines.append(f"| {row.label} | not available | | | | | |")
            absent.append(f"- **{row.label}**: {row.reason}")
            continue
        ratios = [p.cpu_ratio for p in row.exec_pairs]
        cells = [
            _cell(_duration(row.startup_s), claim.get("startup")),
            _cell(_overhead(ratios), claim.get("exec")),
            _cell(_bytes(row.memory_overhead_bytes), claim.get("memory")),
            _cell(_duration(row.cleanup_s), claim.get("cleanup")),
            f"{row.throughput['tasks_per_s']:.1f}" if row.throughput else "—",
            _duration(row.wall_s),
        ]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    out = [f"Measured {meta['started']} ({meta['mode']} mode, {meta['duration_s']:.0f} s): "
           "median (p95) of our runs · the seed document's claim.", ""]
    if rows:  # only peers or scaling asked for: no empty tier table
        out += [*lines, ""]
    if absent:
        out += ["Not measured:", *absent, ""]
    if rows:
        out += ["What each column measures, per tier:", ""]
    for row in rows:
        if row.available and (row.exec_what or row.memory_what or row.cleanup_what):
            parts = [f"exec: {row.exec_what}" if row.exec_what else "",
                     f"memory: {row.memory_what}" if row.memory_what else "",
                     f"cleanup: {row.cleanup_what}" if row.cleanup_what else "",
                     *row.notes]
            out.append(f"- **{row.label}**: " + "; ".join(p for p in parts if p) + ".")
    if any(row.group == "peers" for row in grouped):
        out += ["", "## Peers: the same task side by side, interleaved in this run", "",
                *peer_lines(grouped)]
    if any(row.group == "scaling" for row in grouped):
        out += ["", f"## Throughput across cores ({meta['cores']} cores)", "",
                *scaling_lines(grouped)]
    if any(row.group == "service" for row in grouped):
        out += ["", "## Service over HTTP: WASI hello, submit to result", "",
                *service_lines(grouped)]
    out += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()), ""]
    return "\n".join(out)


def peer_lines(rows: Sequence[Row]) -> list[str]:
    """The peers table: per side its end-to-end median (p95) and how wasmbox compares."""
    by_id = {row.id: row for row in rows}
    lines = ["| Task | Side | Per task, median (p95) | n | wasmbox vs this side, median (p95) |",
             "|---|---|---|---|---|"]
    notes = []
    for row in rows:
        if row.group != "peers":
            continue
        task, _, side = row.label.partition(": ")
        if not row.available:
            lines.append(f"| {task} | {side} | not installed | | {row.reason} |")
            continue
        base = by_id.get(row.compare_to or "")
        ratio = "—" if base is None else _ratio(base.wall_s, row.wall_s)
        lines.append(f"| {task} | {side} | {_duration(row.wall_s)} | {len(row.wall_s)} "
                     f"| {ratio} |")
        notes += [f"- **{row.label}**: {note}." for note in row.notes]
    return [*lines, "", "What each side does (limits on/off):", "", *notes]


def scaling_lines(rows: Sequence[Row]) -> list[str]:
    """Tasks/s of each way to run a batch, per round, and the speedup over one process."""
    scaling = [row for row in rows if row.group == "scaling"]
    by_id = {row.id: row for row in scaling}
    lines = ["| How | Tasks/s, median (min-max of rounds) | vs its reference, median |",
             "|---|---|---|"]
    notes = []
    for row in scaling:
        if not row.available:
            lines.append(f"| {row.label} | not available | {row.reason} |")
            continue
        base = by_id.get(row.compare_to or "")
        mid = median(row.rates)
        speed = "—"
        if base is not None and mid and median(base.rates):
            ref = median(base.rates)
            assert ref is not None
            speed = f"{mid / ref:.2f}x {base.label}"
        span = f"{min(row.rates):.0f}-{max(row.rates):.0f}" if row.rates else ""
        lines.append(f"| {row.label} | {mid or 0:.0f} ({span}) | {speed} |")
        notes += [f"- **{row.label}**: {note}." for note in row.notes]
    return [*lines, "", *notes]


def service_lines(rows: Sequence[Row]) -> list[str]:
    """Tasks/s and submit-to-result percentiles per form and concurrency level."""
    lines = ["| Form, clients | Tasks/s | p50 | p95 | p99 | n |", "|---|---|---|---|---|---|"]
    notes = []
    for row in rows:
        if row.group != "service":
            continue
        if not row.available:
            lines.append(f"| {row.label} | not available | | | | {row.reason} |")
            continue
        ordered = sorted(row.wall_s)
        cells = [_seconds(ordered[min(len(ordered) - 1, int(len(ordered) * q))])
                 for q in (0.50, 0.95, 0.99)]
        lines.append(f"| {row.label} | {row.throughput['tasks_per_s']:.0f} | "
                     + " | ".join(cells) + f" | {len(ordered)} |")
        notes += [f"- **{row.label}**: {note}." for note in row.notes]
    return [*lines, "", *notes]


def _ratio(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """wasmbox's time over the side's, as words: "1.8x slower" or "2.0x faster"."""
    mid_o, mid_t, hi_o, hi_t = median(ours), median(theirs), p95(ours), p95(theirs)
    if not (mid_o and mid_t and hi_o and hi_t):
        return "—"

    def words(r: float) -> str:
        return f"{r:.2f}x slower" if r >= 1 else f"{1 / r:.2f}x faster"

    return f"wasmbox {words(mid_o / mid_t)} ({words(hi_o / hi_t)})"


def chart(rows: Sequence[Row], path: Path) -> str | None:
    """Log-scale startup per tier with the seed's ranges; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'wasmbox[bench]'): no PNG chart"
    shown = [r for r in rows if r.available and r.startup_s]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.5))
    for y, row in enumerate(shown):
        mid, hi = median(row.startup_s), p95(row.startup_s)
        assert mid is not None and hi is not None
        ax.barh(y, mid, color="tab:blue", xerr=[[0], [hi - mid]], capsize=3)
        claim = CLAIM_STARTUP_S.get(row.claim or "")
        if claim:
            ax.plot(claim, [y, y], color="tab:orange", linewidth=6, alpha=0.5)
    ax.set_yticks(range(len(shown)), [r.label for r in shown])
    ax.set_xscale("log")
    ax.set_xlabel("startup, seconds (log): bar = our median, whisker = p95, orange = seed claim")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


_SERVICE_ROW = re.compile(r"service:(poll|wait)-([0-9]+)")
_DASK_ROW = re.compile(r"dask:(\w+)-([0-9]+|local)")
# The service's goals (issue 18), drawn on its panels: tasks/s, p50 in ms.
SERVICE_GOAL_RATE, SERVICE_GOAL_P50_MS = 500.0, 20.0


def scale_chart(rows: Sequence[Row], path: Path) -> str | None:
    """The service's tasks/s and p50 per number of clients, and Dask's tasks/s per worker
    count, side by side; returns why it was skipped (matplotlib absent, no such rows)."""
    service: dict[str, list[tuple[int, float, float]]] = {}
    dask: dict[str, list[tuple[int, float]]] = {}
    local: dict[str, float] = {}
    for row in rows:
        if not row.available or not row.throughput:
            continue
        rate = row.throughput["tasks_per_s"]
        if (found := _SERVICE_ROW.fullmatch(row.id)) and row.wall_s:
            p50 = sorted(row.wall_s)[len(row.wall_s) // 2]
            service.setdefault(found[1], []).append((int(found[2]), rate, p50 * 1e3))
        elif found := _DASK_ROW.fullmatch(row.id):
            if found[2] == "local":
                local[found[1]] = rate
            else:
                dask.setdefault(found[1], []).append((int(found[2]), rate))
    if not service and not dask:
        return "no service or Dask rows: no scale chart"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'wasmbox[bench]'): no scale chart"
    panels = (2 if service else 0) + len(dask)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    ax_iter = iter(axes[0])
    if service:
        rate_ax, p50_ax = next(ax_iter), next(ax_iter)
        for form, points in sorted(service.items()):
            points.sort()
            label = "submit + long-poll" if form == "poll" else "submit-and-wait"
            rate_ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
            p50_ax.plot([p[0] for p in points], [p[2] for p in points], "o-", label=label)
        levels = sorted({p[0] for points in service.values() for p in points})
        rate_ax.axhline(SERVICE_GOAL_RATE, color="grey", linestyle=":", label="goal")
        p50_ax.axhline(SERVICE_GOAL_P50_MS, color="grey", linestyle=":", label="goal")
        for ax, title in ((rate_ax, "service: tasks/s"),
                          (p50_ax, "service: p50 submit to result, ms")):
            ax.set(title=title, xlabel="concurrent clients", ylim=(0, None), xticks=levels)
            ax.legend(fontsize="small")
    for kind, bars in sorted(dask.items()):
        ax = next(ax_iter)
        bars.sort()
        ax.bar([str(b[0]) for b in bars], [b[1] for b in bars], color="tab:blue")
        if kind in local:
            ax.axhline(local[kind], color="tab:orange", linestyle="--",
                       label="Sandbox.map here, 1 thread")
            ax.legend(fontsize="small", loc="upper left")  # above the 1-worker bar
        ax.set(title=f"Dask {kind}: tasks/s", xlabel="workers", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(rows: Sequence[Row], meta: dict[str, Any], out: Path) -> list[str]:
    """results.json, results.md, startup.png and (with service or Dask rows) scale.png into
    `out`; returns messages about skips."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record(rows, meta), indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    skipped = [chart(rows, out / "startup.png")]
    if any(_SERVICE_ROW.fullmatch(row.id) or _DASK_ROW.fullmatch(row.id) for row in rows):
        skipped.append(scale_chart(rows, out / "scale.png"))
    return [why for why in skipped if why]


def print_rows(rows: Sequence[Row]) -> None:
    """A plain summary for the standalone scripts."""
    for row in rows:
        if not row.available:
            print(f"{row.label}: not available: {row.reason}")
            continue
        if row.group:
            print(f"{row.label}: per task {_duration(row.wall_s)}"
                  + (f", {median(row.rates) or 0:.0f} tasks/s" if row.rates else ""))
            continue
        ratios = [p.cpu_ratio for p in row.exec_pairs]
        tps = f"{row.throughput['tasks_per_s']:.1f}/s" if row.throughput else "—"
        print(f"{row.label}: startup {_duration(row.startup_s)}, "
              f"end to end {_duration(row.wall_s)}, exec {_overhead(ratios)}, "
              f"memory {_bytes(row.memory_overhead_bytes)}, cleanup {_duration(row.cleanup_s)}, "
              f"tasks {tps} on {row.throughput.get('concurrency', '?') if row.throughput else '?'}"
              " threads")
        for note in row.notes:
            print(f"    {note}")


def _cell(ours: str, claim: str | None) -> str:
    return f"{ours} · seed {claim}" if claim else ours


def _duration(values: Sequence[float]) -> str:
    mid, hi = median(values), p95(values)
    if mid is None or hi is None:
        return "—"
    return f"{_seconds(mid)} ({_seconds(hi)})"


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def _overhead(ratios: Sequence[float]) -> str:
    mid, hi = median(ratios), p95(ratios)
    if mid is None or hi is None:
        return "—"
    if mid >= 2:  # emulation: a factor reads better than thousands of percent
        return f"x{mid:.1f} (x{hi:.1f})"
    return f"{(mid - 1) * 100:+.0f}% ({(hi - 1) * 100:+.0f}%)"


def _bytes(values: Sequence[float]) -> str:
    mid, hi = median(values), p95(values)
    if mid is None or hi is None:
        return "—"
    return f"{mid / 2**20:.1f} MiB ({hi / 2**20:.1f})"


def standalone(argv: list[str] | None, doc: str | None,
               measure: Callable[[bool, Progress], list[Row]], steps: int,
               lines: Callable[[list[Row]], list[str]]) -> int:
    """The `main` of a benchmark script run on its own: ``--quick``, its rows, its summary."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    rows = measure(args.quick, NoProgress(steps))
    print_rows(rows)
    print("\n".join(lines(rows)))
    return 0
