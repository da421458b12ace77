"""The speed-up bounds over tee-only: pure functions of a run's results, in the framework's JSON
and table and in `gcvm run bench`'s table (which reads that JSON)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from groupcover.bench import report, stats
from orchestrator import report as orchestrator_report


def _result(mode: str, cpu_ms: float | None, masks_ms: float = 0.0, seq: int = 16) -> dict:
    return {
        "model": "minilm",
        "mode": mode,
        "batch": 2,
        "seq": seq,
        "cpu_ms": None if cpu_ms is None else {"median": cpu_ms},
        "mask_generation_ms": masks_ms,
        "latency_ms": {"median": 100.0, "p10": 90.0, "p90": 110.0},
        "throughput": 20.0,
        "rel_err": 1e-7,
        "breakdown_ms": dict(
            master_compute=40.0, deobfuscation=10.0, transfer=20.0, worker_compute=30.0
        ),
        "rpc_calls": 4,
        "bytes_per_forward": 1000,
    }


def _run() -> list[dict]:
    results = [
        _result("tee-only", 80.0),
        _result("plain-offload", 20.0),
        _result("mask-only", 40.0, masks_ms=60.0),
        _result("groupcover", 100.0, masks_ms=100.0),
    ]
    stats.speedup_bounds(results)
    return results


def test_bounds_are_tee_only_cpu_over_the_modes_cpu_with_and_without_masks() -> None:
    tee, plain, masked, gc = _run()
    assert tee["speedup_bound"] == 1.0 and tee["speedup_bound_sustained"] == 1.0
    assert plain["speedup_bound"] == 4.0 and plain["speedup_bound_sustained"] == 4.0
    assert masked["speedup_bound"] == 2.0
    assert masked["speedup_bound_sustained"] == pytest.approx(80.0 / 100.0)
    assert gc["speedup_bound"] == pytest.approx(0.8)
    assert gc["speedup_bound_sustained"] == pytest.approx(0.4)
    assert all(r["speedup_bound_note"] is None for r in (tee, plain, masked, gc))
    # the existing keys keep their names and values
    assert gc["cpu_ms"] == {"median": 100.0} and gc["mask_generation_ms"] == 100.0


def test_without_tee_only_in_the_same_run_the_bounds_are_null_and_say_why() -> None:
    results = [_result("plain-offload", 20.0), _result("groupcover", 50.0, 10.0)]
    stats.speedup_bounds(results)
    for r in results:
        assert r["speedup_bound"] is None and r["speedup_bound_sustained"] is None
        assert r["speedup_bound_note"] == stats.NO_TEE_ONLY
    # tee-only of another shape is not this shape's baseline
    other = [_result("tee-only", 80.0, seq=64), _result("groupcover", 50.0)]
    stats.speedup_bounds(other)
    assert other[1]["speedup_bound"] is None and other[1]["speedup_bound_note"] == stats.NO_TEE_ONLY
    unmeasured = [_result("tee-only", 80.0), _result("groupcover", None)]
    stats.speedup_bounds(unmeasured)
    assert unmeasured[1]["speedup_bound"] is None
    assert unmeasured[1]["speedup_bound_note"] == stats.NO_CPU


def test_the_framework_table_prints_the_bounds_and_flags_modes_below_one(capsys) -> None:
    report.print_table({"results": _run()})
    out = capsys.readouterr().out
    assert "CPU ms" in out and "sust. bound" in out
    assert "0.80*" in out and "4.00" in out
    assert f"groupcover: bound 0.80 < 1: {report.SLOWER}" in out
    assert f"mask-only: sustained bound 0.80 < 1: {report.SLOWER} once its masks" in out
    assert "plain-offload: bound" not in out
    results = [_result("groupcover", 50.0)]
    stats.speedup_bounds(results)
    report.print_table({"results": results})
    assert "no speed-up bounds: tee-only did not run" in capsys.readouterr().out


def _render(runs: dict) -> str:
    buf = io.StringIO()
    Console(file=buf, width=250).print(orchestrator_report.table(runs, "t"))
    return buf.getvalue()


def test_gcvm_run_bench_prints_the_frameworks_bounds_and_flags() -> None:
    text = _render({"c-master0": {"results": _run()}})
    assert "CPU ms" in text and "sust. bound" in text
    assert "0.80*" in text and "0.40*" in text and "4.00" in text
    assert "c-master0 groupcover: bound 0.80 < 1: slower than tee-only even with an" in text
    assert "c-master0 mask-only: sustained bound 0.80 < 1" in text
    results = [_result("groupcover", 50.0)]
    stats.speedup_bounds(results)
    assert "no speed-up bounds: tee-only did not run" in _render({"m": {"results": results}})
    # a document from before the bounds prints no bounds and no note
    old = _render({"m": {"results": [_result("groupcover", 50.0)]}})
    assert "no speed-up bounds" not in old and "slower than tee-only" not in old
