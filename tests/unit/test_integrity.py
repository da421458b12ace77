from __future__ import annotations

import math

import pytest
import torch

from groupcover.errors import IntegrityError, WorkerError
from groupcover.inprocess import InProcessTransport
from groupcover.integrity import EPS64, LayerCheck, bench_integrity
from groupcover.layer_op import HALF, MODULUS, RESIDUE_DTYPE, apply_op
from groupcover.models import load_model
from groupcover.modes import build_for_mode
from groupcover.modular import INPUT_BITS
from groupcover.rng import SecretRandom
from groupcover.transport import LayerOp
from groupcover.worker import WorkerState
from tests.unit.conftest import SMALL_BERT, SMALL_RESNET, SMALL_SEED, rel_error

MODELS = [
    ("bert-base", SMALL_BERT, 2, 12),  # linear
    ("seed-transformer", SMALL_SEED, 2, 6),  # conv1d FFN
    ("resnet18", SMALL_RESNET, 2, 32),  # conv2d
]


class PerturbingWorker(WorkerState):
    """Computes honestly, then changes ONE element of one layer's result, from call `after` of
    that layer on: a float result by `relative` x its largest magnitude (what a worker can
    see); a masked call's int32 residues (mod 2^32) by `quanta` if given, else by `relative` x
    their largest magnitude (about 2^31: residues are uniform), wrapping as residues do."""

    def __init__(
        self, layer_id: str, relative: float = 0.0, after: int = 0, quanta: int | None = None
    ) -> None:
        super().__init__(torch.device("cpu"))
        self.layer_id, self.relative, self.after, self.quanta = layer_id, relative, after, quanta
        self.calls = 0
        self.changed: list[torch.dtype] = []  # the dtype of each result it changed

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, seconds = super().run(owner, layer_id, x)
        if layer_id == self.layer_id:
            self.calls += 1
            if self.calls > self.after:
                where = tuple(size // 2 for size in y.shape)
                if y.dtype == RESIDUE_DTYPE:
                    d = self.quanta
                    if d is None:
                        d = round(self.relative * float(y.abs().max()))
                    y[where] = (int(y[where]) + d + HALF) % MODULUS - HALF
                else:
                    y[where] += self.relative * float(y.abs().max())
                self.changed.append(y.dtype)
        return y, seconds


def _tolerance_quanta(check: LayerCheck, peak: float = 2.0**INPUT_BITS) -> float:
    """`LayerCheck.check_quanta`'s tolerance per output position, in quanta, for an input whose
    fixed-point peak is `peak` (2^22: within its calibrated bound), no wraps there."""
    s_abs, v_abs = float(check.s.abs().sum()), float(check.v_abs.sum())
    return check.rounding * s_abs + check.slack * EPS64 * peak * v_abs


def _target(model: torch.nn.Module) -> str:
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)
    ]
    return names[len(names) // 2]


@pytest.mark.parametrize("mode", ["plain-offload", "mask-only", "groupcover", "groupcover-nomask"])
@pytest.mark.parametrize(("name", "overrides", "batch", "seq"), MODELS)
def test_one_perturbed_output_element_is_caught(
    mode: str, name: str, overrides: dict, batch: int, seq: int
) -> None:
    model, example = load_model(name, 0, **overrides)
    inputs = example(batch, seq)
    layer = _target(model)
    worker = PerturbingWorker(layer, relative=1e-2, after=1)
    transport = InProcessTransport(worker, owner="worker7")
    built = build_for_mode(model, mode, transport, example_inputs=inputs, verify=True)
    with torch.no_grad():
        reference = model(*inputs)
    assert rel_error(built(*inputs), reference) <= 1e-4  # the first call of the layer is honest
    with pytest.raises(IntegrityError) as info:
        built(*inputs)
    # masked modes: one int32 residue moved (by 1e-2 x ~2^31 quanta); else one float element
    masked = mode in ("mask-only", "groupcover")
    assert worker.changed == [RESIDUE_DTYPE if masked else torch.float32]
    assert isinstance(info.value, WorkerError)
    message = str(info.value)
    assert repr(layer) in message and "integrity check failed" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", ["mask-only", "groupcover"])
def test_masked_modes_catch_a_change_far_below_the_mask(mode: str) -> None:
    """In masked modes the worker sees int32 residues, uniform on [-2^31, 2^31): a change of ONE
    residue by d quanta moves s . z by d |s_j| >= d, so d just over twice the check's tolerance
    (a few hundred quanta here, below 2^-20 of what the worker sees, and about 2 x `loosest` of
    the result's own largest value) is caught."""
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 8)
    worker = PerturbingWorker("layer.1.ffn2", after=1)
    built = build_for_mode(
        model, mode, InProcessTransport(worker), example_inputs=inputs, verify=True
    )
    check = built.layers["layer.1.ffn2"].check
    assert check is not None and check.quantum is not None
    built(*inputs)  # honest: the check passes and notes tolerance / max |z|
    assert check.checked == 1 and check.loosest > 0
    worker.quanta = math.floor(2 * _tolerance_quanta(check)) + 1
    assert worker.quanta < 2.0**-20 * HALF  # far below the mask
    assert 2 * check.loosest < 1e-4  # ... and a small fraction of the unmasked result
    with pytest.raises(IntegrityError, match=r"layer\.1\.ffn2"):
        built(*inputs)
    assert worker.changed == [RESIDUE_DTYPE]


@pytest.mark.parametrize("mode", ["plain-offload", "mask-only", "groupcover", "groupcover-nomask"])
@pytest.mark.parametrize(("name", "overrides", "batch", "seq"), MODELS)
def test_an_honest_worker_never_trips_the_check(
    mode: str, name: str, overrides: dict, batch: int, seq: int
) -> None:
    model, example = load_model(name, 0, **overrides)
    with torch.no_grad():
        cases = [(example(batch, seq), None) for _ in range(3)]
        cases = [(inputs, model(*inputs)) for inputs, _ in cases]
    built = build_for_mode(model, mode, InProcessTransport(), verify=True)
    forwards = 8
    for i in range(forwards):
        inputs, reference = cases[i % len(cases)]
        assert rel_error(built(*inputs), reference) <= 1e-4
    stats = built.integrity_stats()
    assert stats["checked"] == forwards * len(built.layers)
    # honest rounding stays below the tolerance: far below it in float (a small multiple of
    # eps against SLACK); for masked layers the tolerance is the worst case of two roundings to
    # whole quanta, which layers with few outputs (8 here) approach to about 0.6
    assert stats["worst_ratio"] < (0.8 if mode in ("mask-only", "groupcover") else 0.5)
    assert built.stats()["integrity"] == stats


def test_the_library_checks_by_default() -> None:
    """No `verify` argument: every layer has its check, and one residue of one masked result
    moved by just over twice the check's tolerance (in quanta) stops the forward."""
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    worker = PerturbingWorker("layer.0.ffn1")
    built = build_for_mode(model, "groupcover", InProcessTransport(worker))
    check = built.layers["layer.0.ffn1"].check
    assert check is not None and check.quantum is not None
    worker.quanta = math.floor(2 * _tolerance_quanta(check)) + 1
    with pytest.raises(IntegrityError):
        built(*example(2, 8))
    assert worker.changed == [RESIDUE_DTYPE]


def test_no_check_without_verify() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    worker = PerturbingWorker("layer.0.ffn1", relative=1e-2)
    built = build_for_mode(model, "groupcover", InProcessTransport(worker), verify=False)
    built(*example(2, 8))  # a wrong result goes unnoticed: verify is off
    assert built.integrity_stats() is None


def test_check_vectors_are_secret_and_bounded_away_from_zero() -> None:
    weight = torch.randn(32, 16)
    op = LayerOp("linear")
    first = LayerCheck.create("fc", weight, op, SecretRandom.from_os())
    second = LayerCheck.create("fc", weight, op, SecretRandom.from_os())
    assert not torch.equal(first.s, second.s)
    assert float(first.s.abs().min()) >= 1.0 and float(first.s.abs().max()) < 2.0
    seeded = [LayerCheck.create("fc", weight, op, SecretRandom.from_seed(3)) for _ in range(2)]
    assert torch.equal(seeded[0].s, seeded[1].s)
    x = torch.randn(5, 16)
    y = apply_op(op, x, weight)
    first.check(x, y)
    y[2, 7] = float("nan")
    with pytest.raises(IntegrityError):
        first.check(x, y)
    with pytest.raises(IntegrityError, match="dtype"):
        first.check(x, apply_op(op, x, weight).double())


def test_bench_integrity_reports_ms_with_and_without_the_check() -> None:
    rows = bench_integrity(((32, 48),), batch=2, seq=8, repeat=2)
    assert [row["dtype"] for row in rows] == ["float32", "float64"]
    for row in rows:
        assert row["layer_ms"] > 0 and row["check_ms"] > 0
        assert row["ratio"] == pytest.approx(row["check_ms"] / row["layer_ms"])


def test_a_default_run_catches_a_one_element_change_of_a_masked_result() -> None:
    """A master with default settings, a worker that moves ONE int32 residue of one masked
    result by 2^10 quanta (2^-21 of the residues' magnitude, 2^31; the check's tolerance on
    this 64-output layer is below 1.1 x sum |s_j| < 2.2 x 64 quanta): the run must stop with
    `IntegrityError`, not report a silently wrong output."""
    from groupcover import launch
    from groupcover.launch import RankSettings, Role
    from groupcover.package.prepare import Prepared

    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = tuple(example(2, 8))
    with torch.no_grad():
        reference = model(*inputs)
    prepared = Prepared(model, inputs, reference, 0.0)
    settings = RankSettings(Role.master, 0, 2, worker=1, modes=("groupcover",), batch=2, seq=8,
                            repeat=1, warmup=0)  # fmt: skip

    def hostile(mode: str) -> InProcessTransport:
        return InProcessTransport(PerturbingWorker("layer.1.ffn2", quanta=2**10), owner=mode)

    with pytest.raises(IntegrityError, match=r"layer\.1\.ffn2.*integrity check failed"):
        launch.run_master(settings, prepared, None, hostile)
    honest = launch.run_master(settings, prepared, None,
                               lambda mode: InProcessTransport(owner=mode))  # fmt: skip
    [result] = honest["results"]
    assert honest["settings"]["results_checked"] is True and result["results_checked"] is True
    assert result["integrity_check"].startswith("results checked (Freivalds")
