"""Refilling the mask pools in the master's idle time, and serving requests at a rate."""

from __future__ import annotations

import argparse
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from groupcover.bench.rate import rate_lines, serve_at_rate
from groupcover.bench.stats import ModeRun
from groupcover.inprocess import InProcessTransport
from groupcover.layer_op import to_residues, with_quantum
from groupcover.masks import MaskPool
from groupcover.models import load_model
from groupcover.modes import build_for_mode
from groupcover.modular import quantum_exponent
from groupcover.refill import IdleRefill, lower_this_thread
from groupcover.rng import SecretRandom
from groupcover.settings import WORKLOAD
from groupcover.transport import LayerOp
from tests.unit.conftest import SMALL_BERT


def pool(budget: int | None = None) -> tuple[MaskPool, torch.Tensor]:
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).double()
    masks = MaskPool(SecretRandom.from_seed(1), budget_bytes=budget)
    op = LayerOp("linear")  # masked: int32 residues in and out, in the weight's quantum
    masks.register("fc", weight, with_quantum(op, quantum_exponent(weight, op)))
    masks.fill("fc", (3, 8), 0, like=torch.randn(3, 8))  # a shape seen, nothing ahead yet
    return masks, weight


def test_refill_one_draws_one_missing_pair_at_a_time() -> None:
    masks, weight = pool()
    assert masks.refill_one(2) and masks.available("fc", (3, 8)) == 1
    assert masks.refill_one(2) and masks.available("fc", (3, 8)) == 2
    assert not masks.refill_one(2)
    stats = masks.stats()
    assert stats["idle_refill"]["pairs"] == 2 and stats["offline"]["pairs"] == 0
    pair = masks.take("fc", (3, 8))
    r, u = pair.consume()
    assert r.dtype == u.dtype == torch.int32
    # u = round(op(rho, W'') / q) mod 2^32, q = 2^c the layer's public quantum
    expected = to_residues(F.linear(r.to(torch.float64), weight), masks.exponent("fc"))
    assert torch.equal(u, expected)


def test_refill_one_keeps_to_the_budget() -> None:
    masks, _ = pool()
    budget = masks.pair_bytes("fc", (3, 8))
    masks, _ = pool(budget)
    assert masks.refill_one(3)
    assert not masks.refill_one(3)  # a second pair would exceed the budget


def test_the_idle_thread_refills_what_forwards_take_and_never_hands_a_pair_twice() -> None:
    masks, _ = pool()
    taken = []  # kept alive, so that no id is reused
    with IdleRefill(masks, pairs=2):
        for _ in range(40):
            pair = masks.take("fc", (3, 8))
            assert all(pair is not other for other in taken) and not pair.used
            taken.append(pair)
            pair.consume()
            time.sleep(0.002)
    stats = masks.stats()
    assert stats["idle_refill"]["pairs"] > 0
    assert stats["used"] == 40


def test_the_refill_thread_runs_at_the_lowest_priority() -> None:
    found: list[int] = []

    def probe() -> None:
        assert lower_this_thread()
        found.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert found == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # not this one


def test_a_failing_refill_is_reported_on_stop() -> None:
    masks, _ = pool()

    def broken(pairs: int = 1) -> bool:
        raise RuntimeError("no")

    masks.refill_one = broken  # type: ignore[method-assign]
    refill = IdleRefill(masks).start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError):
        refill.stop()


def test_serving_at_a_rate_refills_in_idle_time() -> None:
    model, example = load_model("bert-base", **SMALL_BERT)
    inputs = tuple(example(2, 8))
    transport = InProcessTransport(owner="rate")
    module = build_for_mode(model.eval(), "groupcover", transport, example_inputs=inputs,
                            mask_pool=1)  # fmt: skip
    with torch.no_grad():
        module(*inputs)
    run = ModeRun("groupcover", module, transport, 0.0)
    at = serve_at_rate(run, inputs, rate=4.0, requests=3, batch=2)
    assert at["requests"] == 3 and at["served_per_s"] <= 4.0 * 1.05
    assert at["masks_drawn_idle"] > 0 and at["refill"] == "idle thread, nice 19"
    assert at["latency_ms"]["median"] > 0 and at["cpu_ms_per_request"] > 0
    (line,) = rate_lines([{"mode": "groupcover", "at_rate": at}])
    assert line.startswith("at 4 requests/s, groupcover: served")


def test_request_rate_is_a_positive_number() -> None:
    parser = argparse.ArgumentParser()
    (setting,) = [s for s in WORKLOAD if s.flag == "--request-rate"]
    setting.add_to(parser)
    assert parser.parse_args(["--request-rate", "2.5"]).request_rate == 2.5
    assert parser.parse_args([]).request_rate is None
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--request-rate", bad])
