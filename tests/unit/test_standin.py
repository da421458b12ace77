"""The stand-in secret model: MiniLM-L6 with every encoder Linear perturbed by 2%."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from groupcover.models import load_model
from groupcover.models.minilm import model_dir, tokenize
from groupcover.models.standin import PERTURBED, RELATIVE, main, perturb, standin_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def public() -> dict[str, np.ndarray]:
    return load_file(str(model_dir() / "model.safetensors"))


def perturbed_names(state: dict[str, np.ndarray]) -> list[str]:
    return [name for name in state if PERTURBED.match(name)]


def test_every_encoder_linear_is_perturbed_by_two_percent(public: dict[str, np.ndarray]) -> None:
    state = perturb(public, seed=1)
    names = perturbed_names(public)
    assert len(names) == 6 * 6 * 2  # 6 layers x (q, k, v, attn out, ffn1, ffn2) x (weight, bias)
    for name in names:
        delta = np.linalg.norm(state[name].astype(np.float64) - public[name])
        relative = delta / np.linalg.norm(public[name].astype(np.float64))
        assert relative == pytest.approx(RELATIVE, rel=1e-3), name
        assert state[name].dtype == public[name].dtype and state[name].shape == public[name].shape
        # nearly every element moved (no public row or column survives)
        assert np.mean(state[name] != public[name]) > 0.99, name
    untouched = [n for n in public if n not in names and not n.startswith("pooler.")]
    assert untouched and all(np.array_equal(state[n], public[n]) for n in untouched)
    assert not any(n.startswith("pooler.") for n in state)


def test_two_loads_differ_and_a_seed_reproduces(public: dict[str, np.ndarray]) -> None:
    first, second = perturb(public), perturb(public)  # OS CSPRNG
    seeded, again = perturb(public, seed=7), perturb(public, seed=7)
    name = "encoder.layer.3.intermediate.dense.weight"
    assert not np.array_equal(first[name], second[name])
    assert not np.array_equal(first[name], seeded[name])
    for n in perturbed_names(public):
        assert np.array_equal(seeded[n], again[n]), n
    assert not np.array_equal(perturb(public, seed=8)[name], seeded[name])


def test_the_built_in_name_is_a_fresh_secret_model_that_still_embeds() -> None:
    public_model, _ = load_model("minilm")
    one, example = load_model("minilm-standin")
    two, _ = load_model("minilm-standin")
    seeded, _ = load_model("minilm-standin", perturb_seed=3)
    again, _ = load_model("minilm-standin", perturb_seed=3)
    weight = "encoder.layer.0.attention.qkv.weight"
    w = {n: dict(m.named_parameters())[weight] for n, m in
         (("public", public_model), ("one", one), ("two", two), ("seeded", seeded),
          ("again", again))}  # fmt: skip
    assert not torch.equal(w["one"], w["two"]) and not torch.equal(w["one"], w["public"])
    assert torch.equal(w["seeded"], w["again"])
    inputs = example(4, 32)
    assert torch.equal(inputs[0], tokenize(_sentences(4), 32)[0])
    with torch.no_grad():
        ours, theirs = one(*inputs), public_model(*inputs)
    cosine = (ours * theirs).sum(dim=1)
    assert torch.all(cosine > 0.9) and torch.all(cosine < 1 - 1e-6)  # a close but other model


def _sentences(n: int) -> list[str]:
    from groupcover.models.minilm import example_sentences

    return example_sentences(n)


def test_write_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "standin"
    assert main(["--out", str(out), "--seed", "5"]) == 0
    assert "not secret" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "tokenizer.json", "model.safetensors"}
    written = load_file(str(out / "model.safetensors"))
    expected = standin_state(seed=5)
    assert written.keys() == expected.keys()
    assert all(np.array_equal(written[n], expected[n]) for n in expected)
    assert main(["--out", str(out)]) == 2  # never overwrites


def test_no_row_or_column_of_the_standin_is_in_the_public_checkpoint(
    public: dict[str, np.ndarray],
) -> None:
    from orchestrator import scan

    state = perturb(public, seed=2)
    index = scan.build_index(scan.select_targets(state))
    assert set(index.targets) == set(perturbed_names(public))
    hits, _ = scan.scan_file(model_dir() / "model.safetensors", index)
    assert hits == []  # float32, float16, bfloat16, rows and columns: no public copy
    # the same scan finds the public weights in the public file
    query = {"q": public["encoder.layer.0.attention.self.query.weight"]}
    found, _ = scan.scan_file(model_dir() / "model.safetensors", scan.build_index(query))
    assert {h.index for h in found if h.orientation == "row" and h.dtype == "float32"} == set(
        range(384)
    )
