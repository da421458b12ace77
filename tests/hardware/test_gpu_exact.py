"""GroupCover's offloaded Linear, Conv1d and Conv2d on a CUDA worker hold the CPU path's bound.

The worker turns TF32 off when it starts (`groupcover.worker.exact_math`): with TF32 a float32
GEMM keeps a 10-bit mantissa and the integer mixing amplifies the rounding far past 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groupcover.inprocess import InProcessTransport
from groupcover.master import protect
from groupcover.worker import WorkerState

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip(
        f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() False "
        f"(CUDA build: {torch.version.cuda or 'none'})",
        allow_module_level=True,
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (as tests/unit/conftest.py; not imported: its transports
    fixture module needs more than a GPU machine's bare torch)."""
    return float((out - ref).abs().max() / ref.abs().max())


# the CPU path's bound for one offloaded layer (tests/unit/test_master.py, test_obfuscate.py)
BOUND = 1e-5

LAYERS = {
    "linear": (lambda: nn.Linear(768, 3072), lambda g: torch.randn(8, 128, 768, generator=g)),
    "conv1d": (
        lambda: nn.Conv1d(64, 96, 3, padding=1),
        lambda g: torch.randn(4, 64, 50, generator=g),
    ),
    "conv2d": (
        lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1),
        lambda g: torch.randn(2, 64, 28, 28, generator=g),
    ),
}


def test_the_worker_turns_tf32_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    state = WorkerState()
    assert state.device.type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "masked"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_offloaded_layer_on_cuda_is_exact(kind: str, masked: bool) -> None:
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[kind]
    layer = nn.Sequential(make_layer())
    x = make_input(torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = layer(x)
        state = WorkerState(torch.device("cuda"))
        transport = InProcessTransport(state)
        protected = protect(layer, transport, scheme="groupcover", masked=masked, seed=0)
        out = protected(x)
    assert transport.timings.calls == 1
    assert all(p.weight.device.type == "cuda" for p in state._layers.values())
    assert out.device.type == "cpu"
    assert rel_error(out, reference) <= BOUND


def test_groupcover_bert_with_masks_on_cuda_is_exact() -> None:
    from groupcover.models import load_model
    from groupcover.modes import build_for_mode

    model, example = load_model("bert-base", seed=0)
    inputs = example(2, 32)
    with torch.no_grad():
        reference = model(*inputs)
        built = build_for_mode(
            model, "groupcover", InProcessTransport(WorkerState()), seed=0, example_inputs=inputs
        )
        out = built(*inputs)
    assert rel_error(out, reference) <= 1e-4
