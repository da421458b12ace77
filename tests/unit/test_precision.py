"""`python -m groupcover.measure.precision`: the layers it times, its summaries, and the exactness
reason a masked call's worker computes in float64 (its int32 payloads are X + rho with rho
uniform on all of int32: float32 keeps 24 of their 32 bits, and loses most of the input)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from groupcover.integrity import MINILM_SHAPES
from groupcover.masks import MaskPool
from groupcover.measure import precision
from groupcover.modular import INPUT_BITS


def test_shapes_are_minilms_offloaded_layers() -> None:
    layers = precision.shapes(8, 128)
    assert [(s.in_features, s.out_features) for s in layers] == list(MINILM_SHAPES)
    assert {(384, 384), (384, 1536), (1536, 384), (384, 1152)} == {
        (s.in_features, s.out_features) for s in layers
    }
    assert all(s.rows == 1024 and s.per_forward == 6 for s in layers)
    assert layers[2].label == "ffn1 384->1536"
    assert layers[2].flops == 2 * 1024 * 384 * 1536


def test_spread_and_paired_ratio() -> None:
    s = precision.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s == {"median": 3.0, "p25": 2.0, "p75": 4.0, "n": 5}
    # ratios are taken round by round, not from the two medians
    r = precision.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 1.0])
    assert r["median"] == 3.0 and r["p25"] == 2.5 and r["p75"] == 3.0 and r["n"] == 3
    with pytest.raises(ValueError):
        precision.paired_ratio([1.0], [1.0, 2.0])


def test_time_products_interleaves_both_dtypes_per_layer() -> None:
    layers = precision.shapes(1, 4)[:2]
    rows = precision.time_products(torch.device("cpu"), layers, repeat=3, warmup=0)
    assert [row["layer"] for row in rows] == [s.label for s in layers]
    for row in rows:
        assert "call" not in row  # the whole call is timed on CUDA only
        product = row["product"]
        assert isinstance(product, dict)
        assert product["float32_ms"]["n"] == product["float64_ms"]["n"] == 3
        assert product["ratio"]["n"] == 3 and product["ratio"]["median"] > 0
    totals = precision.per_forward_ms(rows)
    assert set(totals) == {"float32", "float64"} and all(v > 0 for v in totals.values())
    assert "float64/float32" in precision.render_times(rows, "t")


def test_the_whole_call_is_timed_through_the_worker() -> None:
    """What CUDA machines time besides the product (here on the CPU, to run the code)."""
    rows = precision.time_products(torch.device("cpu"), precision.shapes(1, 4)[:1], repeat=2,
                                   warmup=1, calls_too=True)  # fmt: skip
    call = rows[0]["call"]
    assert isinstance(call, dict) and call["ratio"]["n"] == 2
    assert precision.per_forward_ms(rows, "call")["float64"] > 0
    assert "call" in precision.render_times(rows, "t")


def test_a_float32_worker_loses_the_masked_input(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = precision.Shape("small", 384, 384, 64)
    f64 = precision.masked_error(layer, torch.float64)
    f32 = precision.masked_error(layer, torch.float32)
    assert f64["input_bits"] == f32["input_bits"] == INPUT_BITS
    # float64: as close to the float32 model as the float32 model is to the exact product
    assert f64["rel_err"] < 1e-5 and f64["rel_err_vs_exact"] < 1e-6
    # float32: 8 of the payload's 32 bits are gone (X + rho, rho uniform on int32), and with
    # them most of the input's 22: hundreds of times the float32 model's own error
    assert f32["rel_err"] > 1e-4 and f32["rel_err"] > 100 * f32["float32_model_rel_err"]
    # with a mask as small as the input (none: rho = 0) float32 would do, and hide nothing
    monkeypatch.setattr(precision, "MaskPool", partial(MaskPool, scale=0.0))
    assert precision.masked_error(layer, torch.float32)["rel_err"] < 1e-5


def test_main_prints_the_ratio_and_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.json"
    argv = ["--batch", "1", "--seq", "8", "--repeat", "2", "--warmup", "0", "--devices", "cpu",
            "--json", str(out)]  # fmt: skip
    assert precision.main(argv) == 0
    printed = capsys.readouterr().out
    assert "per MiniLM forward" in printed and "ratio" in printed
    assert "rel. error vs float32 model" in printed
    document = json.loads(out.read_text())
    assert len(document["timings"]) == 4 and document["repeat"] == 2
    assert {e["worker_dtype"] for e in document["errors"]} == {"float32", "float64"}
    with pytest.raises(SystemExit):
        precision.main(["--repeat", "0"])
