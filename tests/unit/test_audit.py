from __future__ import annotations

import torch

from groupcover.audit import Audit
from groupcover.master import protect
from groupcover.models import load_model
from groupcover.modes import MODES, build_for_mode
from groupcover.rng import SecretRandom
from groupcover.scheme import GroupCoverScheme, LayerSecret
from groupcover.transport import InProcessTransport
from tests.unit.conftest import SMALL_BERT


def audited(mode: str) -> dict:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 8)
    built = build_for_mode(model, mode, InProcessTransport(), seed=4, audit=True)
    built(*inputs)
    built(*inputs)
    assert built.audit is not None
    return built.audit.report()


def test_reports_per_mode() -> None:
    layers = 4 * SMALL_BERT["layers"]
    for mode in MODES:
        report = audited(mode)
        assert report["mode"] == mode
        if mode == "tee-only":
            assert report["payloads"] == 0 and report["leaks"] == []
            continue
        assert report["payloads"] == layers + 2 * layers  # publish once, then two forwards
        assert report["bytes"] > 0
        if mode.startswith("groupcover"):
            assert report["leaks"] == []
        if mode == "plain-offload":  # plaintext weights are published by design
            assert any("equals the plaintext weight" in leak for leak in report["leaks"])
        if mode == "mask-only":
            assert not any("unmasked input" in leak for leak in report["leaks"])


class PlaintextScheme(GroupCoverScheme):
    """Deliberately broken: publishes the plaintext weight with its rows shuffled."""

    def obfuscate(self, weight, bias, generator):  # type: ignore[no-untyped-def]
        _, secret = super().obfuscate(weight, bias, generator)
        shuffled = weight[generator.randperm(weight.shape[0])]
        return shuffled.contiguous(), secret


def test_a_scheme_that_publishes_plaintext_is_flagged() -> None:
    model, _ = load_model("bert-base", 0, **SMALL_BERT)
    protected = protect(
        model, InProcessTransport(), scheme=PlaintextScheme(), masked=True, seed=0, audit=True
    )
    leaks = protected.audit.report()["leaks"]
    assert len(leaks) == len(protected.layers)
    assert all("matches a plaintext weight row" in leak for leak in leaks)


def test_zero_masks_are_flagged() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    protected = protect(
        model, InProcessTransport(), scheme="groupcover", masked=True, seed=0, audit=True
    )
    protected.masks.scale = 0.0  # every online mask is r = 0: the payload is the bare input
    protected(*example(2, 8))
    leaks = protected.audit.report()["leaks"]
    assert len(leaks) == len(protected.layers)
    assert all("run payload equals the unmasked input" in leak for leak in leaks)


def test_secrets_in_payloads_are_flagged() -> None:
    weight, bias = torch.randn(8, 6), torch.randn(8)
    published, secret = GroupCoverScheme(4).obfuscate(weight, bias, SecretRandom.from_seed(0))
    audit = Audit(mode="test")
    audit.register_layer("fc", weight, bias, secret)
    assert isinstance(secret, LayerSecret) and secret.in_perm is not None
    audit.observe("publish", "fc", published)
    assert audit.report()["leaks"] == []
    audit.observe("publish", "fc", torch.cat([published, bias[:, None]], dim=1))
    audit.observe("run", "fc", secret.in_perm.to(torch.float32))
    audit.observe("publish", "fc", secret.inverse.to(torch.float32))
    audit.observe("publish", "fc", weight.clone())
    audit.observe("run", "fc", torch.linalg.inv(secret.inverse[0]).to(torch.float32))
    leaks = audit.report()["leaks"]
    assert any("rows of the mixing matrices" in leak for leak in leaks)
    assert any("contains the bias" in leak for leak in leaks)
    assert any("contains the input permutation" in leak for leak in leaks)
    assert any("contains the inverse mixing" in leak for leak in leaks)
    assert any("equals the plaintext weight" in leak for leak in leaks)
    assert audit.report()["payloads"] == 6
