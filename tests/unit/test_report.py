"""The result table and chart are pure functions of the masters' JSON documents."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from orchestrator import report


def _result(mode: str, median: float, throughput: float, rel_err: float = 1e-6) -> dict:
    return {
        "model": "minilm",
        "mode": mode,
        "batch": 8,
        "seq": 128,
        "latency_ms": {"median": median, "p10": median * 0.9, "p90": median * 1.2},
        "throughput": throughput,
        "max_abs_err": rel_err / 2,
        "rel_err": rel_err,
        "breakdown_ms": {
            "master_compute": median * 0.3,
            "deobfuscation": median * 0.1,
            "transfer": median * 0.2,
            "worker_compute": median * 0.4,
        },
    }


RUNS = {
    "c-master0": {
        "results": [_result("plain-offload", 100.0, 80.0), _result("groupcover", 110.0, 72.7, 3e-6)]
    },
    "c-master1": {
        "results": [_result("plain-offload", 120.0, 66.7), _result("groupcover", 150.0, 53.3, 5e-6)]
    },
}


def test_overhead_is_relative_to_plain_offload_of_the_same_master() -> None:
    rows = {(r["master"], r["mode"]): r for r in report.rows(RUNS)}
    assert rows[("c-master0", "plain-offload")]["overhead"] == 1.0
    assert abs(rows[("c-master0", "groupcover")]["overhead"] - 1.10) < 1e-9
    assert abs(rows[("c-master1", "groupcover")]["overhead"] - 1.25) < 1e-9


def test_overhead_absent_without_baseline() -> None:
    runs = {"m": {"results": [_result("groupcover", 110.0, 72.7)]}}
    assert report.rows(runs)[0]["overhead"] is None


def test_aggregate_sums_throughput_and_keeps_worst_error() -> None:
    agg = {a["mode"]: a for a in report.aggregate(RUNS)}
    assert agg["groupcover"]["masters"] == 2
    assert abs(agg["groupcover"]["throughput"] - (72.7 + 53.3)) < 1e-9
    assert agg["groupcover"]["rel_err"] == 5e-6
    assert agg["plain-offload"]["latency_median_ms"] == 110.0


def test_table_lists_every_master_and_mode() -> None:
    buf = io.StringIO()
    Console(file=buf, width=200).print(report.table(RUNS, "t"))
    text = buf.getvalue()
    assert text.count("c-master0") == 2 and text.count("c-master1") == 2
    assert "1.250x" in text and "1.100x" in text
    assert "66.70" in text  # throughput, not cut by the width


def test_chart_is_a_png(tmp_path: Path) -> None:
    path = report.chart(RUNS, tmp_path / "sub" / "c.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_the_table_says_whether_results_were_checked() -> None:
    def render(runs: dict) -> str:
        buf = io.StringIO()
        Console(file=buf, width=200).print(report.table(runs, "t"))
        return buf.getvalue()

    checked = {**_result("groupcover", 110.0, 72.7), "results_checked": True}
    unchecked = {**_result("plain-offload", 100.0, 80.0), "results_checked": False}
    assert "results checked (Freivalds" in render({"m": {"results": [checked]}})
    text = render({"m": {"results": [checked, unchecked]}})
    assert "plain-offload: results NOT checked (--no-verify)" in text
    # a document from before results said so counts as not checked
    assert "results NOT checked" in render(RUNS)
