"""`python -m groupcover bench --transport-micro`: the payloads, its flags, a real run on loopback;
and tests/hardware's ratio printer and gpu_check.sh's flow on a machine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from groupcover.errors import UsageError
from groupcover.measure import transport_micro
from tests.hardware import gpu_ratios

ROOT = Path(__file__).resolve().parents[2]


def test_payloads_are_the_models_layers() -> None:
    rows = transport_micro.payloads(2, 16)
    shapes = {(p.model, p.in_features, p.out_features, p.rows) for p in rows}
    assert ("minilm", 384, 1536, 32) in shapes and ("minilm", 1536, 384, 32) in shapes
    assert ("bert-base", 768, 3072, 32) in shapes and ("bert-base", 768, 768, 1) in shapes
    assert len(rows) == 8
    with pytest.raises(UsageError, match="unknown model 'gpt'"):
        transport_micro.payloads(1, 1, ["gpt"])


@pytest.mark.parametrize("text", ["nonsense", "1.2.3.4", ":80", "1.2.3.4:99999", "h:x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="is not ADDR:PORT"):
        transport_micro.parse_address(text)


@pytest.mark.slow
def test_loopback_run_on_the_real_wire(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    proc = subprocess.run(
        [sys.executable, "-m", "groupcover", "bench", "--transport-micro", "--batch", "1",
         "--seq", "4", "--repeat", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Wire per call, loopback" in proc.stdout and "wire MB/s" in proc.stdout
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 16 and doc["address"].startswith("127.0.0.1:")
    for row in doc["rows"]:
        assert row["roundtrip_ms"]["median"] > 0 and row["wire_ms"] > 0
        assert row["bytes_sent"] == row["rows"] * row["bytes_sent"] // row["rows"]
        assert row["dtype"] in ("float32", "float64")
    big = next(r for r in doc["rows"] if r["layer"] == "768->3072" and r["dtype"] == "float64")
    assert big["bytes_sent"] == 4 * 768 * 8 and big["bytes_received"] == 4 * 3072 * 8


def test_gpu_ratios_print_the_targets(tmp_path: Path) -> None:
    def result(mode: str, ms: float, err: float = 1e-6) -> dict:
        return {"mode": mode, "latency_ms": {"median": ms}, "throughput": 8000 / ms,
                "rel_err": err}  # fmt: skip

    doc = {"results": [result("tee-only", 1000.0, 0.0), result("plain-offload", 100.0),
                       result("groupcover-nomask", 110.0), result("mask-only", 400.0),
                       result("groupcover", 420.0, 2e-4)],
           "host": {"cuda": "NVIDIA H200"}, "settings": {"threads": 1}}  # fmt: skip
    text = "\n".join(gpu_ratios.lines(doc))
    assert "device: NVIDIA H200" in text
    assert "tee-only / plain-offload = 10.00x faster offloaded (target >= 5x: met)" in text
    assert "tee-only / groupcover-nomask = 9.09x" in text
    assert "groupcover-nomask / plain-offload = 1.100" in text
    assert "groupcover / mask-only = 1.050" in text
    assert "worst rel err 2.0e-04 (target <= 1e-04: MISSED)" in text
    path = tmp_path / "r.json"
    path.write_text("{}")
    assert gpu_ratios.main([str(path)]) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="with CUDA the script runs the whole bench"
)
def test_gpu_check_runs_up_to_cuda_and_skips(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "tests/hardware/gpu_check.sh")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path),
             "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device here" in proc.stdout
    assert "SKIPPED" in proc.stdout and "no CUDA device" in proc.stdout
    assert "SKIP bench --local on cuda: no CUDA device" in proc.stdout
    assert "done, status 0" in proc.stdout
    assert (tmp_path / "hardware-tests.txt").exists()
    # the worker's precision runs without CUDA too: CPU rows and the ratio, no cuda rows
    assert "cpu per MiniLM forward" in proc.stdout and "cuda per MiniLM forward" not in proc.stdout
    assert json.loads((tmp_path / "precision.json").read_text())["errors"]


def test_the_orchestrators_command_line_still_serves() -> None:
    """`gcvm run bench --transport-micro` starts the worker as `python -m
    groupcover.measure.transport_micro --serve ADDR:PORT` (orchestrator/run/micro.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "groupcover.measure.transport_micro", "--serve", "127.0.0.1:0",
         "--seconds", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(transport_micro.READY_MARK + " 127.0.0.1:")
