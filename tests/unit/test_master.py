from __future__ import annotations

from collections import Counter
from concurrent.futures import Future

import pytest
import torch
from torch import nn

from groupcover.inprocess import InProcessTransport
from groupcover.master import NothingToOffload, OffloadedLayer, protect
from groupcover.models import load_model
from groupcover.modes import MODES, UnknownMode, build_for_mode, mode_settings
from tests.unit.conftest import SMALL_BERT, SMALL_RESNET, SMALL_SEED, rel_error


class CountingTransport(InProcessTransport):
    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[tuple[str, str]] = Counter()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.add_observer(self._count)

    def _count(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        self.events[(event, layer_id)] += 1
        if event == "publish":
            self.shapes[layer_id] = tuple(tensor.shape)

    def count(self, event: str) -> int:
        return sum(n for (e, _), n in self.events.items() if e == event)


def test_publish_once_per_layer_and_one_call_per_layer_per_forward() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    transport = CountingTransport()
    protected = protect(model, transport, scheme="groupcover", masked=False, seed=1)
    layers = list(protected.layers)
    assert len(layers) == 4 * SMALL_BERT["layers"]  # qkv, out, ffn1, ffn2
    assert transport.count("publish") == len(layers)
    for _ in range(3):
        protected(*example(2, 8))
    assert transport.count("publish") == len(layers)
    assert all(transport.events[("publish", name)] == 1 for name in layers)
    assert transport.count("run") == 3 * len(layers)
    hidden = SMALL_BERT["hidden"]
    assert transport.shapes["layer.0.attention.qkv"] == (3 * hidden, hidden)


def test_protected_copy_keeps_no_plaintext_weight_of_offloaded_layers() -> None:
    model, _ = load_model("bert-base", 0, **SMALL_BERT)
    protected = protect(model, InProcessTransport(), scheme="groupcover", masked=True, seed=1)
    originals = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    kept = list(protected.state_dict().values())
    for weight in originals:
        assert not any(t.shape == weight.shape and torch.equal(t, weight) for t in kept)
    assert not any(isinstance(m, nn.Linear) for m in protected.modules())
    assert isinstance(model.layer[0].ffn1, nn.Linear)  # the caller's model is left as it was


def test_seed_transformer_calls_per_layer() -> None:
    model, example = load_model("seed-transformer", 0, **SMALL_SEED)
    transport = CountingTransport()
    protected = protect(model, transport, scheme="groupcover", masked=False, seed=1)
    protected(*example(2, 6))
    per_encoder = sum(1 for (_, name) in transport.events if name.startswith("encoder.0."))
    per_decoder = sum(1 for (_, name) in transport.events if name.startswith("decoder.0."))
    assert per_encoder == 2 * 4  # publish + run for qkv, out, conv1, conv2
    assert per_decoder == 2 * 7  # + cross q, fused cross kv, cross out
    assert transport.shapes["encoder.0.ffn.conv1"] == (96, 64, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "overrides", "batch", "seq"),
    [
        ("bert-base", SMALL_BERT, 2, 12),
        ("seed-transformer", SMALL_SEED, 2, 6),
        ("resnet18", SMALL_RESNET, 2, 32),
    ],
)
def test_every_mode_is_exact(mode: str, name: str, overrides: dict, batch: int, seq: int) -> None:
    model, example = load_model(name, 0, **overrides)
    inputs = example(batch, seq)
    with torch.no_grad():
        reference = model(*inputs)
    transport = InProcessTransport()
    built = build_for_mode(model, mode, transport, seed=2, example_inputs=inputs)
    assert rel_error(built(*inputs), reference) <= 1e-4
    if mode == "tee-only":
        assert transport.timings.calls == 0 and built.layers == {}
    else:
        assert transport.timings.calls == len(built.layers) > 0
        assert transport.timings.deobf_s > 0


def test_nothing_to_offload() -> None:
    with pytest.raises(NothingToOffload, match="no layer to offload") as info:
        protect(
            nn.Sequential(nn.ReLU(), nn.LayerNorm(4)),
            InProcessTransport(),
            scheme="groupcover",
            masked=False,
            seed=0,
        )
    assert info.value.hint
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(NothingToOffload):
        protect(depthwise, InProcessTransport(), scheme="identity", masked=False, seed=0)


def test_unsupported_layers_stay_in_the_master() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 6, 1))
    protected = protect(model, InProcessTransport(), scheme="groupcover", masked=True, seed=0)
    assert list(protected.layers) == ["1"]
    assert isinstance(protected.module[0], nn.Conv2d)
    assert isinstance(protected.module[1], OffloadedLayer)
    x = torch.randn(2, 4, 5, 5)
    assert rel_error(protected(x), model(x).detach()) < 1e-5


def test_mode_settings() -> None:
    assert mode_settings("tee-only") == (None, False)
    assert mode_settings("plain-offload") == ("identity", False)
    assert mode_settings("mask-only") == ("identity", True)
    assert mode_settings("groupcover") == ("groupcover", True)
    assert mode_settings("groupcover-nomask") == ("groupcover", False)
    assert set(MODES) == {
        "tee-only",
        "plain-offload",
        "mask-only",
        "groupcover",
        "groupcover-nomask",
        "hardened",
        "hardened-nomask",
        "groupcover-2w",
        "hardened-2w",
    }
    assert mode_settings("hardened-2w") == ("hardened", True)  # + a mask worker
    with pytest.raises(UnknownMode) as info:
        mode_settings("shadownet")
    assert isinstance(info.value, ValueError)
    assert all(mode in info.value.hint for mode in MODES)
    with pytest.raises(UnknownMode):
        build_for_mode(nn.Linear(2, 2), "nope", InProcessTransport(), seed=0)


def test_deobfuscation_is_timed_apart_from_the_round_trip() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    transport = InProcessTransport()
    protected = protect(model, transport, scheme="groupcover", masked=True, seed=1)
    protected(*example(2, 8))
    timings = transport.timings
    assert timings.calls == len(protected.layers)
    assert timings.deobf_s > 0 and 0 < timings.worker_s <= timings.roundtrip_s


def test_a_shared_layer_is_published_once_and_replaced_everywhere() -> None:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    transport = CountingTransport()
    protected = protect(model, transport, scheme="groupcover", masked=True, seed=0)
    assert list(protected.layers) == ["0"] and transport.count("publish") == 1
    assert protected.module[0] is protected.module[2]
    x = torch.randn(3, 6)
    assert rel_error(protected(x), model(x).detach()) < 1e-5
    assert transport.count("run") == 2


def test_biases_are_never_published() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    payloads: list[tuple[str, str, torch.Tensor]] = []
    transport = InProcessTransport()
    transport.add_observer(lambda event, name, t: payloads.append((event, name, t)))
    protected = protect(model, transport, scheme="groupcover", masked=True, seed=1)
    protected(*example(2, 8))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for event, name, tensor in payloads:
        bias = linears[name].bias.detach()
        if event == "publish":
            assert tensor.shape == linears[name].weight.shape  # no extra row or column
        flat = tensor.reshape(-1, tensor.shape[-1]).float()  # masked modes send float64
        for vector in (flat, flat.t()):
            if vector.shape[-1] == bias.numel():
                assert not torch.isclose(vector, bias, rtol=1e-5, atol=1e-7).all(dim=-1).any()


@pytest.mark.parametrize("mode", ["groupcover", "groupcover-nomask"])
def test_ffn1_outputs_stay_features_first_and_later_forwards_stay_exact(mode: str) -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 12)
    with torch.no_grad():
        reference = model(*inputs)
    transport = InProcessTransport()
    built = build_for_mode(model, mode, transport, seed=3, example_inputs=inputs, mask_pool=4)
    for _ in range(3):
        assert rel_error(built(*inputs), reference) <= 1e-4
    expected = [f"layer.{i}.ffn1" for i in range(SMALL_BERT["layers"])]
    assert built.features_first_layers() == expected
    if built.masks is not None:  # ffn2's masks were drawn in the layout of its input
        assert built.masks.stats()["online_refill"]["pairs"] == 0


class Branchy(nn.Module):
    """a -> relu -> b -> c: a and b feed only offloaded layers; c's output also feeds a residual,
    d's is the model's result."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(6, 10),
            nn.Linear(10, 6),
            nn.Linear(6, 6),
            nn.Linear(6, 6),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        g = self.c(h)
        return self.d(g) + g


def test_layout_probe_keeps_only_outputs_that_feed_offloaded_layers() -> None:
    model = Branchy().eval()
    x = torch.randn(4, 5, 6)
    protected = protect(model, InProcessTransport(), scheme="groupcover", masked=True, seed=0)
    for _ in range(2):
        out = protected(x)
        assert rel_error(out, model(x).detach()) < 1e-5
    assert protected.features_first_layers() == ["a", "b"]
    assert out.is_contiguous()


def _published_and_sent(seed: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    transport = InProcessTransport()
    published: list[torch.Tensor] = []
    sent: list[torch.Tensor] = []
    transport.add_observer(
        lambda event, _, t: (published if event == "publish" else sent).append(t)
    )
    protected = protect(model, transport, scheme="groupcover", masked=True, seed=seed)
    protected(*example(2, 8))
    return published, sent, protected.stats()["secrets"]


def test_two_default_runs_draw_different_secrets() -> None:
    first, first_sent, notice = _published_and_sent(None)
    second, second_sent, _ = _published_and_sent(None)
    assert "OS CSPRNG" in notice
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(first_sent, second_sent, strict=True))


def test_seeded_runs_are_reproducible_and_say_so() -> None:
    first, first_sent, notice = _published_and_sent(5)
    second, second_sent, _ = _published_and_sent(5)
    assert notice == "secrets reproducible from seed 5: not secret"
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first_sent, second_sent, strict=True))
    other, _, _ = _published_and_sent(6)
    assert not torch.equal(first[0], other[0])


class ResultRecordingTransport(InProcessTransport):
    """Keeps every result the worker returns, as the master receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[torch.Tensor] = []

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        future = super().run_async(layer_id, x)
        self.results.append(future.result())
        return future


def test_masked_modes_publish_float64_and_send_and_receive_int32_residues() -> None:
    published, sent, _ = _published_and_sent(None)
    assert published and sent
    assert all(t.dtype == torch.float64 for t in published)  # computed in float64
    assert all(t.dtype == torch.int32 for t in sent)  # payloads X + rho mod 2^32
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    transport = ResultRecordingTransport()
    protected = protect(model, transport, scheme="groupcover", masked=True, seed=0)
    assert all(layer.op.params.get("quantum") is not None for layer in protected.layers.values())
    protected(*example(2, 8))
    assert transport.results
    assert all(t.dtype == torch.int32 for t in transport.results)  # results mod 2^32
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    transport = ResultRecordingTransport()
    dtypes: list[torch.dtype] = []
    transport.add_observer(lambda *event: dtypes.append(event[2].dtype))
    protect(model, transport, scheme="groupcover", masked=False)(*example(2, 8))
    assert set(dtypes) == {torch.float32}  # unmasked modes stay float32
    assert {t.dtype for t in transport.results} == {torch.float32}
