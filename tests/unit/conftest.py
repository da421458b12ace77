"""Shared helpers for the framework's unit tests: one torch thread, small model configs."""

from __future__ import annotations

import pytest
import torch

SMALL_BERT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab_size": 500}
SMALL_SEED = {
    "encoder_layers": 2,
    "decoder_layers": 2,
    "d_model": 64,
    "heads": 4,
    "d_ff": 96,
    "vocab_size": 100,
}
SMALL_RESNET = {"width": 8, "classes": 10}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# `transport` (in-process, TCP wire, real RPC; parametrized), the session's worker processes.
from tests.unit.transports import rpc_world, transport, two_sessions, wire_worker  # noqa: E402, F401
