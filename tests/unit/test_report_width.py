"""The results table piped into a file or a CI log keeps every column header whole."""

from __future__ import annotations

from rich.console import Console

from orchestrator import report, ui


def _run(mode: str) -> dict:
    return {
        "mode": mode, "model": "minilm", "batch": 1, "seq": 8, "throughput": 12.34,
        "latency_ms": {"median": 11234.5, "p10": 11200.0, "p90": 11300.0}, "rel_err": 1.2e-6,
        "overhead": 2.123, "cpu_ms": {"median": 1123.4},
        "breakdown_ms": {k: 1123.4 for k in ("master_compute", "deobfuscation", "transfer",
                                             "worker_compute")},
        "speedup_bound": 2.0, "speedup_bound_sustained": 0.5, "key_release": "k",
    }  # fmt: skip


def test_the_piped_table_keeps_its_headers() -> None:
    runs = {"gcvm-demo-master0": {"results": [_run("plain-offload"), _run("groupcover")]}}
    width = ui.out.width if not ui.out.is_terminal else 240
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(report.table(runs, "t"))
    text = console.export_text()
    for header in ("vs plain-offload", "sust. bound", "p10-p90 ms"):
        assert header in text, text


def test_the_key_release_table_says_whether_broker_and_packages_were_authenticated() -> None:
    runs = {
        "m0": {"settings": {"key_release": {
            "label": "model key released without attestation", "source": "broker",
            "attested": False, "broker_authenticated": True,
            "broker_identity": {"source": "kernel command line (measured)"},
            "package_authenticated": True}}},
        "m1": {"settings": {"key_release": {
            "label": "x", "source": "broker", "attested": False,
            "broker_authenticated": False, "package_authenticated": False}}},
    }  # fmt: skip
    console = Console(width=240, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(report.key_release_table(runs))
    text = console.export_text()
    assert "pinned (kernel command line (measured))" in text and "signed by the owner" in text
    assert text.count("NOT authenticated") == 2
