"""One-pass reductions over a tensor's memory: the same answers as the plain reductions, in
every layout the master's tensors come in."""

from __future__ import annotations

import math

import pytest
import torch

from groupcover.tensorpass import abs_max, dense_layout, memory_flat, received_abs_max
from groupcover.wire.client import all_finite


def _layouts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    return [
        base,  # row-major
        torch.randn(4, 6, 5, generator=g, dtype=torch.float64).movedim(0, -1),  # features-first
        torch.randn(7, 3, generator=g).t(),  # a transposed float32 table
        base[:, 1:4, ::2],  # not dense: a strided slice
        base[2:4],  # dense with a storage offset
    ]


@pytest.mark.parametrize("t", _layouts(), ids=["row-major", "features-first", "t", "slice", "off"])
def test_abs_max_is_the_largest_magnitude_in_any_layout(t: torch.Tensor) -> None:
    assert abs_max(t) == float(t.abs().max())
    flat = memory_flat(t)
    assert flat.dim() == 1 and flat.numel() == t.numel()
    assert sorted(flat.tolist()) == sorted(t.reshape(-1).tolist())  # every element once
    if dense_layout(t):
        assert flat.data_ptr() == t.data_ptr()  # a view: no copy


def test_abs_max_sees_a_negative_peak_nan_and_infinity() -> None:
    t = torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=torch.float64).t()
    assert abs_max(t) == 3.0
    t[0, 1] = float("nan")
    assert math.isnan(abs_max(t))
    t[0, 1] = float("-inf")
    assert abs_max(t) == float("inf")
    assert abs_max(torch.empty(0, 3)) == 0.0


def test_dense_layout_tells_permuted_strides_from_gaps() -> None:
    t = torch.zeros(3, 4, 5)
    assert dense_layout(t) and dense_layout(t.permute(2, 0, 1))
    assert not dense_layout(t[:, :, ::2]) and not dense_layout(t.expand(2, 3, 4, 5))


def test_the_wires_finiteness_pass_gives_the_checks_scale() -> None:
    """A received result carries max |y| from the finiteness pass: the integrity check's scale
    without a pass of its own; a tensor without that note gets a pass."""
    y = torch.tensor([[1.0, -7.5], [2.0, 0.5]], dtype=torch.float64).t()
    plain = y.clone()
    assert all_finite(y, (1, 0))
    assert received_abs_max(y) == 7.5 == received_abs_max(plain) == abs_max(y)
    y.fill_(0.0)  # only a result as received: the note is not a pass
    assert received_abs_max(y) == 7.5 and abs_max(y) == 0.0
    bad = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    assert not all_finite(bad, (0,)) and math.isnan(received_abs_max(bad))
