"""`groupcover.measure.fused_restore`: the unfused copy of a scheme is the same scheme with its
hooks off (same outputs, the torch path), and the comparison runs on a real model."""

from __future__ import annotations

import pytest
import torch

from groupcover import kernels
from groupcover.inprocess import InProcessTransport
from groupcover.master import protect
from groupcover.measure import fused_restore
from groupcover.models import load_model
from groupcover.rng import SecretRandom
from groupcover.schemes import SCHEMES, make_scheme


def test_the_unfused_copy_has_its_hooks_off_and_is_not_registered() -> None:
    scheme = make_scheme("groupcover", 4)
    plain = fused_restore.unfused(scheme)
    assert isinstance(plain, type(scheme)) and plain.k == scheme.k
    weight, bias = torch.randn(8, 6), torch.randn(8)
    _published, secret = scheme.obfuscate(weight, bias, SecretRandom.from_seed(0))
    assert scheme.input_order(secret) is not None and plain.input_order(secret) is None
    assert scheme.fused_restore(secret, True) is not None
    assert plain.fused_restore(secret, True) is None
    assert type(plain) not in SCHEMES.values()


@pytest.mark.skipif(not kernels.available(), reason="numba is not installed")
def test_fused_and_unfused_give_the_same_outputs_and_are_timed() -> None:
    model, example = load_model("minilm", 0)
    model.eval()
    inputs = tuple(example(2, 16))
    with torch.no_grad():
        reference = model(*inputs)
        outputs = []
        for scheme in (
            make_scheme("groupcover", 4),
            fused_restore.unfused(make_scheme("groupcover", 4)),
        ):
            protected = protect(model, InProcessTransport(), scheme=scheme, masked=True,
                                example_inputs=inputs, mask_pool=2)  # fmt: skip
            outputs.append(protected(*inputs))
    for output in outputs:
        assert (output - reference).abs().max() <= 1e-4 * reference.abs().max()
    rows = fused_restore.compare("minilm", ("groupcover",), batch=1, seq=8, forwards=1)
    assert [row["variant"] for row in rows] == ["fused", "unfused"]
    assert all(float(row["median_ms"]) > 0 for row in rows)  # type: ignore[arg-type]
