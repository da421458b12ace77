"""The -2w modes: masks' products from a second worker that does not collude with the first.

Exact against the plain model, no product in the master, both results checked, both workers'
payloads audited, and what each worker alone receives independent of the input (the leakage
meter on each), in process and over the real wire on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch

from groupcover import leakage
from groupcover.audit import Audit
from groupcover.bench.local import LocalRun
from groupcover.errors import IntegrityError, UsageError
from groupcover.inprocess import InProcessTransport
from groupcover.launch import RankSettings, Role
from groupcover.masks import MaskPair
from groupcover.master import worker_label
from groupcover.models import load_model
from groupcover.modes import MODES, TWO_WORKER_LABEL, build_for_mode, protection, uses_mask_worker
from groupcover.schemes.base import LayerSecret
from groupcover.twoworkers import TwoWorkerTransport
from groupcover.wire.client import TcpTransport
from groupcover.wire.server import Limits, WorkerServer
from groupcover.worker import WorkerState
from tests.unit.conftest import SMALL_BERT, rel_error

TWO_WORKER_MODES = ("groupcover-2w", "hardened-2w")


class Recorder:
    """An observer keeping every run payload one worker receives, by layer."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, torch.Tensor]] = []

    def __call__(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        if event == "run":
            self.payloads.append((layer_id, tensor.detach().clone()))


def small_bert() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    model, example = load_model("bert-base", **SMALL_BERT)
    return model.eval(), tuple(example(2, 16))


def in_process_pair() -> TwoWorkerTransport:
    return TwoWorkerTransport(InProcessTransport(owner="worker"), InProcessTransport(owner="mask"))


def test_the_two_worker_modes_are_masked_modes_that_name_the_assumption() -> None:
    assert set(TWO_WORKER_MODES) <= set(MODES)
    for mode in TWO_WORKER_MODES:
        assert uses_mask_worker(mode)
        assert protection(mode) == {"protected": True, "protection": TWO_WORKER_LABEL}
        assert "collude" in TWO_WORKER_LABEL
    assert not any(uses_mask_worker(m) for m in MODES if m not in TWO_WORKER_MODES)


@pytest.mark.parametrize("mode", TWO_WORKER_MODES)
def test_exact_and_no_product_in_the_master(mode: str) -> None:
    model, inputs = small_bert()
    transport = in_process_pair()
    protected = build_for_mode(model, mode, transport, seed=3, example_inputs=inputs)
    with torch.no_grad():
        reference = model(*inputs)
        for _ in range(2):
            out = protected(*inputs)
            assert protected.top_up_masks(1)  # nothing to draw ahead: True, nothing done
    assert rel_error(out, reference) <= 1e-4
    stats = protected.masks.stats()
    assert stats["offline"]["pairs"] == 0 and stats["online_refill"]["pairs"] == 0
    assert stats["mask_worker"]["pairs"] == stats["used"] == 2 * len(protected.layers)
    calls = transport.mask_transport.timings.calls
    assert calls == 2 * len(protected.layers) and transport.timings.calls == calls
    integrity = protected.integrity_stats()
    assert integrity is not None and integrity["checked"] == 2 * calls  # both results checked


def test_each_worker_alone_learns_nothing() -> None:
    """The worker's payloads are int32 residues X + rho, uniform mod 2^32, and the mask
    worker's are the masks rho alone: neither correlates with the input beyond the leakage
    meter's null, whatever the input (two inputs of very different scale give payloads of one
    law), and the audit of each finds no leak."""
    model, inputs = small_bert()
    transport = in_process_pair()
    worker_sees, mask_worker_sees = Recorder(), Recorder()
    transport.add_observer(worker_sees)
    transport.mask_transport.add_observer(mask_worker_sees)
    protected = build_for_mode(model, "groupcover-2w", transport, audit=True,
                               example_inputs=inputs)  # fmt: skip
    prepared: list[tuple[str, torch.Tensor]] = []  # each call's prepared input, in order
    masks: list[torch.Tensor] = []  # each call's mask r, in order
    draw = protected.masks.draw_mask

    def keep(layer_id: str, shape: tuple[int, ...], x: torch.Tensor) -> MaskPair:
        prepared.append((layer_id, x.detach().double().clone()))
        pair = draw(layer_id, shape, x)
        masks.append(pair.r.clone())
        return pair

    protected.masks.draw_mask = keep  # type: ignore[method-assign]
    with torch.no_grad():
        for _ in range(4):
            protected(*inputs)
    for seen in (worker_sees, mask_worker_sees):
        assert [name for name, _ in seen.payloads] == [name for name, _ in prepared]
        by_width: dict[int, leakage.CorrelationMeter] = {}
        for (_, payload), (_, x) in zip(seen.payloads, prepared, strict=True):
            assert payload.dtype == torch.int32  # residues mod 2^32 to both workers
            rows = payload.reshape(-1, payload.shape[-1]).double()
            by_width.setdefault(rows.shape[1], leakage.CorrelationMeter()).add(
                rows / rows.abs().max(), x.reshape(-1, x.shape[-1])
            )
        for width, meter in by_width.items():
            verdict = leakage.correlation_verdict(meter.max_abs_correlation(), meter.tokens,
                                                  width, alpha=1e-3)  # fmt: skip
            assert not verdict["above_null"], (width, verdict)
    for report in (protected.audit.report(), protected.mask_audit.report()):
        assert report["leaks"] == [] and not report["input_exposed"]
        assert report["audited_calls"] > 0
    assert protected.mask_audit.report()["mask_worker"] is True
    # the mask worker's payload is r itself, never anything of x
    assert len(masks) == len(mask_worker_sees.payloads)
    pairs = zip(mask_worker_sees.payloads, masks, strict=True)
    assert all(torch.equal(p, r) for (_, p), r in pairs)


def test_the_mask_workers_audit_flags_anything_but_r() -> None:
    audit = Audit(mode="groupcover-2w").for_mask_worker()
    weight = torch.randn(6, 8, dtype=torch.float64)
    audit.register_layer("fc", weight, None, LayerSecret(0, 6))
    x = torch.randn(4, 8, dtype=torch.float64)
    r = torch.randint(-(2**31), 2**31, (4, 8), dtype=torch.int64).to(torch.int32)  # rho
    audit.note_call("fc", x, x, MaskPair(r, r[:0]))
    audit.observe("run", "fc", r.clone())
    assert audit.leaks == []
    audit.note_call("fc", x, x, MaskPair(r, r[:0]))
    fixed = x.mul(2.0**20).round().to(torch.int32)  # X for a bound of 4
    audit.observe("run", "fc", fixed + r)  # the worker's payload X + rho (mod 2^32)
    assert any("not the mask r alone" in leak for leak in audit.leaks)


class WrongMasks(InProcessTransport):
    """A mask worker that returns u off in one element (by 2^16 result quanta, wrapping)."""

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        y = super().run_async(layer_id, x).result().clone()
        assert y.dtype == torch.int32  # residues mod 2^32
        y[(0,) * y.dim()] += 1 << 16
        done: Future[torch.Tensor] = Future()
        done.set_result(y)
        return done


class WrongResults(WrongMasks):
    """A worker that returns its result off in one element."""


@pytest.mark.parametrize("mode", ["hardened-2w", "groupcover-2w"])
def test_a_wrong_u_from_the_mask_worker_is_caught(mode: str) -> None:
    model, inputs = small_bert()
    transport = TwoWorkerTransport(InProcessTransport(owner="w"), WrongMasks(owner="m"))
    protected = build_for_mode(model, mode, transport, example_inputs=inputs)
    with pytest.raises(IntegrityError) as caught, torch.no_grad():
        protected(*inputs)
    # residues mod 2^32 are checked as the pair's joint result y - u: both workers are named
    named = str(caught.value).split(":")[0]
    assert named == "InProcessTransport or the worker behind WrongMasks"
    assert named == f"{worker_label(transport)} or {worker_label(transport.mask_transport)}"


def test_a_wrong_result_from_the_worker_is_caught_and_named() -> None:
    model, inputs = small_bert()
    transport = TwoWorkerTransport(WrongResults(owner="w"), InProcessTransport(owner="m"))
    protected = build_for_mode(model, "groupcover-2w", transport, example_inputs=inputs)
    with pytest.raises(IntegrityError) as caught, torch.no_grad():
        protected(*inputs)
    # named with the mask worker: y - u is checked as one, wrong in either result
    named = str(caught.value).split(":")[0]
    assert named == "WrongResults or the worker behind InProcessTransport"
    assert named == f"{worker_label(transport)} or {worker_label(transport.mask_transport)}"


def test_one_check_of_the_pair_counts_both_results() -> None:
    model, inputs = small_bert()
    transport = TwoWorkerTransport(InProcessTransport(owner="w"), InProcessTransport(owner="m"))
    protected = build_for_mode(model, "hardened-2w", transport, example_inputs=inputs)
    with torch.no_grad():
        protected(*inputs)
    stats = protected.integrity_stats()
    assert stats is not None and stats["checked"] == 2 * len(protected.layers)
    assert 0 < float(stats["worst_ratio"]) < 1.0


@pytest.fixture
def two_servers() -> Iterator[tuple[WorkerServer, WorkerServer]]:
    made = [WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")),
                         Limits(timeout_s=20.0), name).start()
            for name in ("worker1", "worker2")]  # fmt: skip
    yield made[0], made[1]
    for server in made:
        server.stop()


def test_over_the_wire_on_loopback(two_servers: tuple[WorkerServer, WorkerServer]) -> None:
    model, inputs = small_bert()
    first, second = two_servers
    transport = TwoWorkerTransport(
        TcpTransport(first.address, "worker1", "m/2w", 20.0),
        TcpTransport(second.address, "worker2", "m/2w", 20.0),
    )
    try:
        protected = build_for_mode(model, "hardened-2w", transport, example_inputs=inputs)
        with torch.no_grad():
            out = protected(*inputs)
            reference = model(*inputs)
        assert rel_error(out, reference) <= 1e-4
        mask_side = transport.mask_transport.timings
        assert mask_side.calls == len(protected.layers) == transport.timings.calls
        assert mask_side.bytes_sent > 0 and transport.published_bytes > 0
    finally:
        transport.close()


def test_a_two_worker_mode_needs_a_distinct_mask_worker() -> None:
    base = {"role": Role.master, "rank": 0, "world_size": 3, "worker": 1,
            "modes": ("groupcover-2w",)}  # fmt: skip
    with pytest.raises(UsageError, match="second worker"):
        RankSettings(**base).validate()  # type: ignore[arg-type]
    for bad in (1, 0, 3):
        with pytest.raises(UsageError):
            RankSettings(**base, mask_worker=bad).validate()  # type: ignore[arg-type]
    RankSettings(**base, mask_worker=2).validate()  # type: ignore[arg-type]
    one = {**base, "modes": ("groupcover",), "world_size": 2}
    RankSettings(**one).validate()  # type: ignore[arg-type]


def test_the_local_bench_starts_a_mask_worker() -> None:
    local = LocalRun(("--modes", "hardened-2w"), workers=2)
    master = local.argv("master", 1234)
    assert master[master.index("--world-size") + 1] == "3"
    assert master[master.index("--mask-worker") + 1] == "2"
    worker = local.argv("worker", 1234, 2)
    assert worker[worker.index("--rank") + 1] == "2"
    assert "--mask-worker" not in LocalRun(("--modes", "hardened")).argv("master", 1)
