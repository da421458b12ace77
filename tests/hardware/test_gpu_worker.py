"""A worker on a CUDA device: published weights stay on the GPU and results match the CPU."""

from __future__ import annotations

import pytest
import torch

from groupcover.inprocess import InProcessTransport
from groupcover.transport import LayerOp
from groupcover.worker import WorkerState

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)


def test_worker_keeps_weights_on_gpu_and_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 768, generator=gen)
    x = torch.randn(8, 128, 768, generator=gen)
    state = WorkerState()
    assert state.device.type == "cuda"
    transport = InProcessTransport(state)
    transport.publish("ffn1", weight, LayerOp("linear"))
    y = transport.run("ffn1", x)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, x @ weight.T, rtol=1e-3, atol=1e-3)


def test_groupcover_bert_on_gpu_worker_is_exact() -> None:
    from groupcover.models import load_model
    from groupcover.modes import build_for_mode

    model, example = load_model("bert-base", seed=0)
    inputs = example(2, 32)
    with torch.no_grad():
        reference = model(*inputs)
        protected = build_for_mode(model, "groupcover", InProcessTransport(WorkerState()), seed=0)
        out = protected(*inputs)
    rel = (out - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-4
