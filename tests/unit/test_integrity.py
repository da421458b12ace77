from __future__ import annotations

import pytest
import torch

from groupcover.errors import IntegrityError, WorkerError
from groupcover.inprocess import InProcessTransport
from groupcover.integrity import LayerCheck, bench_integrity
from groupcover.layer_op import apply_op
from groupcover.models import load_model
from groupcover.modes import build_for_mode
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
    """Computes honestly, then changes ONE element of one layer's result by `relative` x the
    result's largest magnitude (what a worker can see), from call `after` of that layer on."""

    def __init__(self, layer_id: str, relative: float, after: int = 0) -> None:
        super().__init__(torch.device("cpu"))
        self.layer_id, self.relative, self.after = layer_id, relative, after
        self.calls = 0

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, seconds = super().run(owner, layer_id, x)
        if layer_id == self.layer_id:
            self.calls += 1
            if self.calls > self.after:
                where = tuple(size // 2 for size in y.shape)
                y[where] += self.relative * float(y.abs().max())
        return y, seconds


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
    assert isinstance(info.value, WorkerError)
    message = str(info.value)
    assert repr(layer) in message and "integrity check failed" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", ["mask-only", "groupcover"])
def test_masked_modes_catch_a_change_far_below_the_mask(mode: str) -> None:
    """In masked modes the result is ~2^24 x larger than the layer's output: a change of 2^-20
    of it is about 1/16 of the output's own scale, and it is caught."""
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 8)
    worker = PerturbingWorker("layer.1.ffn2", relative=2.0**-20)
    built = build_for_mode(
        model, mode, InProcessTransport(worker), example_inputs=inputs, verify=True
    )
    with pytest.raises(IntegrityError, match=r"layer\.1\.ffn2"):
        built(*inputs)


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
    assert stats["worst_ratio"] < 0.5  # honest rounding stays far below the tolerance
    assert built.stats()["integrity"] == stats


def test_the_library_checks_by_default() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    worker = PerturbingWorker("layer.0.ffn1", relative=1e-9)
    built = build_for_mode(model, "groupcover", InProcessTransport(worker))
    with pytest.raises(IntegrityError):
        built(*example(2, 8))


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
    """A master with default settings, a worker that moves ONE element of one masked result by
    1e-9 of the result's largest magnitude: the run must stop with `IntegrityError`, not report
    a silently wrong output."""
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
        return InProcessTransport(PerturbingWorker("layer.1.ffn2", relative=1e-9), owner=mode)

    with pytest.raises(IntegrityError, match=r"layer\.1\.ffn2.*integrity check failed"):
        launch.run_master(settings, prepared, None, hostile)
    honest = launch.run_master(settings, prepared, None,
                               lambda mode: InProcessTransport(owner=mode))  # fmt: skip
    [result] = honest["results"]
    assert honest["settings"]["results_checked"] is True and result["results_checked"] is True
    assert result["integrity_check"].startswith("results checked (Freivalds")
