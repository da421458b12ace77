"""The results table piped into a file or a CI log keeps every column header whole."""

from __future__ import annotations

from rich.console import Console

from orchestrator import report, ui


def _run(mode: str) -> dict:
    return {
        "mode": mode, "model": "minilm", "batch": 1, "seq": 8, "throughput": 1.0,
        "latency_ms": {"median": 10.0, "p10": 9.0, "p90": 11.0}, "rel_err": 1e-6,
        "overhead": 1.5, "breakdown_ms": {}, "cpu_ms": {"median": 5.0},
        "speedup_bound": 2.0, "speedup_bound_sustained": 0.5, "key_release": "k",
    }  # fmt: skip


def test_the_piped_table_keeps_its_headers() -> None:
    runs = {"m0": {"results": [_run("plain-offload"), _run("groupcover")]}}
    width = ui.out.width if not ui.out.is_terminal else 240
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(report.table(runs, "t"))
    text = console.export_text()
    for header in ("vs plain-offload", "sust. bound", "p10-p90 ms"):
        assert header in text, text
