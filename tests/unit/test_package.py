"""Model packages: protect offline, run from the package, publish by reference.

Small BERTs and a two-layer factory model; the wire tests use a real `WorkerServer` on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from groupcover import launch
from groupcover.__main__ import main
from groupcover.bench.run import benchmark
from groupcover.errors import WorkerError
from groupcover.inprocess import InProcessTransport
from groupcover.launch import RankSettings, Role
from groupcover.models import load_model
from groupcover.package.build import ProtectOptions, protect, protect_source
from groupcover.package.keys import read_key
from groupcover.package.prepare import prepare
from groupcover.package.runtime import ModeUnavailable, open_package
from groupcover.package.seal import SealError
from groupcover.package.source import ModelSpec, Source
from groupcover.published import PublishedFile
from groupcover.rng import SecretRandom
from groupcover.schemes.hardened import HardenedScheme
from groupcover.wire.client import TcpTransport
from groupcover.wire.server import WorkerServer
from groupcover.worker import WorkerState
from tests.unit.conftest import SMALL_BERT, rel_error

FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)
        self.n = nn.LayerNorm(32)

    def forward(self, x):
        return self.b(torch.relu(self.n(self.a(x))))

def make():
    torch.manual_seed(0)
    return Net(), (torch.randn(4, 16),)
"""


def small_bert() -> tuple[torch.nn.Module, Source]:
    model, _ = load_model("bert-base", 0, **SMALL_BERT)
    spec = ModelSpec("bert", dataclasses.asdict(model.config), "small-bert")
    return model, Source(model, spec)


def make_package(tmp: Path, scheme: str = "hardened", baselines: bool = False,
                 references: tuple[tuple[int, int], ...] = ((2, 16),)) -> Path:  # fmt: skip
    _, source = small_bert()
    out = tmp / f"pkg-{scheme}-{int(baselines)}"
    protect_source(source, out, ProtectOptions(scheme=scheme, baselines=baselines,
                                               references=references))  # fmt: skip
    return out


def plaintext(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = tuple(example(batch, seq))
    with torch.no_grad():
        return model(*inputs), inputs


def unsealed(path: Path):
    return open_package(path).unseal(read_key(path / "model.key"))


@pytest.mark.parametrize("scheme", ["hardened", "groupcover"])
def test_round_trip_matches_the_plaintext_model(tmp_path: Path, scheme: str) -> None:
    path = make_package(tmp_path, scheme)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["scheme"] == scheme and manifest["baselines"] is None
    assert (path / "model.key").stat().st_mode & 0o777 == 0o600
    reference, inputs = plaintext()
    package = unsealed(path)
    assert torch.equal(package.reference(2, 16), reference)
    for mode in manifest["modes"]:
        built = package.build(mode, InProcessTransport(owner=mode), example=inputs)
        assert rel_error(built(*package.inputs(2, 16)), reference) < 1e-4, mode


def test_publish_by_reference_over_the_wire_and_fallback(tmp_path: Path) -> None:
    path = make_package(tmp_path)
    reference, inputs = plaintext()
    package = unsealed(path)
    state = WorkerState(torch.device("cpu"))
    state.add_published(PublishedFile(path / "published.safetensors"))
    server = WorkerServer("127.0.0.1", 0, state).start()
    bare = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu"))).start()
    try:
        for mode in ("hardened", "hardened-nomask"):
            transport = TcpTransport(server.address, "worker1")
            built = package.build(mode, transport, example=inputs)
            assert rel_error(built(*inputs), reference) < 1e-4
            assert transport.published_by_reference == 4 * SMALL_BERT["layers"]
            assert transport.published_bytes == 0  # no weight crossed the wire
            assert transport.worker_peak_rss() > 0
            transport.close()
        transport = TcpTransport(bare.address, "worker2")  # no copy: the tensors are sent
        built = package.build("hardened", transport, example=inputs)
        assert rel_error(built(*inputs), reference) < 1e-4
        assert transport.published_by_tensor == 4 * SMALL_BERT["layers"]
        assert transport.published_by_reference == 0
        transport.close()
    finally:
        server.stop()
        bare.stop()


def test_worker_refuses_a_tampered_published_tensor(tmp_path: Path) -> None:
    path = make_package(tmp_path)
    copy = tmp_path / "worker-copy.safetensors"
    shutil.copy(path / "published.safetensors", copy)
    entry = PublishedFile(copy).entries["1"]
    with copy.open("r+b") as f:  # one flipped bit in layer 1's tensor
        f.seek(entry.start + 5)
        byte = f.read(1)
        f.seek(entry.start + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    state = WorkerState(torch.device("cpu"))
    state.add_published(PublishedFile(copy))
    server = WorkerServer("127.0.0.1", 0, state).start()
    try:
        transport = TcpTransport(server.address, "worker1")
        with pytest.raises(WorkerError, match=r"worker1 .* refused published layer: .*SHA-256"):
            unsealed(path).build("hardened-nomask", transport)
        transport.close()
    finally:
        server.stop()


def test_tampered_truncated_bundle_and_wrong_key_are_refused(tmp_path: Path) -> None:
    path = make_package(tmp_path)
    key = read_key(path / "model.key")
    files = open_package(path)
    with pytest.raises(SealError, match="failed authentication"):
        files.unseal(bytes(32))
    sealed = path / "master.sealed"
    original = sealed.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x40
    sealed.write_bytes(bytes(tampered))
    with pytest.raises(SealError, match=r"chunk \d+ failed authentication"):
        files.unseal(key)
    sealed.write_bytes(original[:-100])
    with pytest.raises(SealError, match="truncated"):
        files.unseal(key)
    sealed.write_bytes(original)
    (path / "model.key").write_bytes(b"short")
    with pytest.raises(SealError, match="not a model key"):
        read_key(path / "model.key")


def test_baseline_modes_need_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_package(tmp_path)
    with pytest.raises(ModeUnavailable, match="protected without --baselines"):
        open_package(path).check_modes(["plain-offload"])
    code = main(["bench", "--local", "--model", str(path), "--key-file", str(path / "model.key"),
                 "--modes", "tee-only,hardened"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "tee-only" in err[0] and "--baselines" in " ".join(err)
    with_baselines = make_package(tmp_path, baselines=True)
    manifest = json.loads((with_baselines / "manifest.json").read_text())
    assert "benchmarks only" in manifest["baselines"]["warning"]
    reference, inputs = plaintext()
    package = unsealed(with_baselines)
    for mode in ("tee-only", "plain-offload", "mask-only"):
        built = package.build(mode, InProcessTransport(owner=mode), example=inputs)
        assert rel_error(built(*inputs), reference) < 1e-4, mode


def _float32_rows(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to(torch.float32).contiguous().numpy().tobytes()


def test_no_plaintext_offloaded_weight_in_the_master(tmp_path: Path) -> None:
    model, _ = small_bert()
    plain_rows = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            plain_rows += [_float32_rows(row) for row in module.weight]
    path = make_package(tmp_path)
    _, inputs = plaintext()
    package = unsealed(path)
    for mode in ("hardened", "hardened-nomask"):
        built = package.build(mode, InProcessTransport(owner=mode), example=inputs)
        built(*inputs)
        held = [t for t in built.module.state_dict().values()]
        for layer in built.layers.values():
            held += list(layer.secret.tensors().values())
        if built.masks is not None:
            for layer in built.masks._layers.values():
                assert layer.weight is None  # published weights are read when needed
                for pool in layer.pools.values():
                    for pair in pool:
                        held += [pair.r, pair.u]
        held += list(package.tensors.values())  # the whole decrypted bundle
        blob = b"".join(_float32_rows(t) for t in held if t.is_floating_point())
        assert blob and not any(row in blob for row in plain_rows), mode
    planted = blob + _float32_rows(model.layer[1].ffn2.weight)  # the scan would see one
    assert any(row in planted for row in plain_rows)


def test_the_master_never_obfuscates_at_run_time(tmp_path: Path, monkeypatch) -> None:
    path = make_package(tmp_path)
    _reference, _inputs = plaintext()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("obfuscation called at run time")

    from groupcover import obfuscate
    from groupcover.schemes import GroupCoverScheme

    monkeypatch.setattr(HardenedScheme, "obfuscate", refuse)
    monkeypatch.setattr(GroupCoverScheme, "obfuscate", refuse)
    monkeypatch.setattr(obfuscate, "obfuscate_layer", refuse)
    settings = RankSettings(Role.master, 0, 2, worker=1, model=str(path), modes=("hardened",),
                            batch=2, seq=16, key_file=path / "model.key")  # fmt: skip
    settings.validate()
    prepared = prepare(settings.model_request())
    [result] = benchmark(
        prepared, ("hardened",), lambda mode: InProcessTransport(owner=mode), model_name="x",
        batch=2, seq=16, repeat=1, warmup=0, seed=None, audit=False,
    )  # fmt: skip
    assert result["rel_err"] < 1e-4 and result["exactness"] == "against the sealed reference"


def test_exactness_is_not_checked_without_a_sealed_reference(tmp_path: Path) -> None:
    path = make_package(tmp_path)
    settings = RankSettings(Role.master, 0, 2, worker=1, model=str(path), modes=("hardened",),
                            batch=3, seq=8, key_file=path / "model.key")  # fmt: skip
    prepared = prepare(settings.model_request())
    assert prepared.reference is None
    [result] = benchmark(
        prepared, ("hardened",), lambda mode: InProcessTransport(owner=mode), model_name="x",
        batch=3, seq=8, repeat=1, warmup=0, seed=None, audit=True,
    )  # fmt: skip
    assert result["rel_err"] is None
    assert "audit skipped" in result["audit_note"] and "audit" not in result
    assert result["exactness"] == "exactness not checked: no sealed reference for 3x8"


def test_the_key_from_a_broker_over_loopback_labels_the_results(tmp_path: Path) -> None:
    from orchestrator.attest.broker import Broker, serve_in_thread
    from orchestrator.attest.policy import parse_policy

    path = make_package(tmp_path)
    policy = parse_policy({"resources": {"gcvm/model/key": str(path / "model.key")}}, tmp_path)
    server = serve_in_thread(Broker(policy, insecure_no_attestation=True), "127.0.0.1", 0)
    out = tmp_path / "result.json"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        settings = RankSettings(Role.master, 0, 2, worker=1, model=str(path),
                                modes=("hardened-nomask",), batch=2, seq=16, repeat=1, warmup=0,
                                broker=url, tee="none", json_path=out)  # fmt: skip
        settings.validate()
        prepared = prepare(settings.model_request())
    finally:
        server.shutdown()
        server.server_close()
    document = launch.run_master(settings, prepared, None,
                                lambda mode: InProcessTransport(owner=mode))  # fmt: skip
    launch.write_json(document, settings)
    saved = json.loads(out.read_text())
    assert saved["settings"]["key_release"]["label"] == "model key released without attestation"
    assert saved["settings"]["key_release"]["attested"] is False
    assert saved["results"][0]["key_release"] == "model key released without attestation"
    assert saved["results"][0]["rel_err"] < 1e-4
    assert saved["settings"]["peak_rss_mb"]["master"] > 0


def test_a_factory_file_is_a_source(tmp_path: Path) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "pkg"
    owner = Ed25519PrivateKey.generate()  # a package's code runs only from a signed package
    protect(f"{factory}:make", out, ProtectOptions(baselines=True, signer=owner))
    namespace: dict[str, object] = {}
    exec(FACTORY, namespace)
    model, (x,) = namespace["make"]()  # type: ignore[operator]
    with torch.no_grad():
        reference = model(x)
    files = open_package(out)
    files.verify(owner.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    package = files.unseal(read_key(out / "model.key"))
    assert package.reference(8, 128) is not None  # a factory's input is fixed: any shape
    for mode in ("hardened", "hardened-nomask", "tee-only", "mask-only"):
        built = package.build(mode, InProcessTransport(owner=mode), example=(x,))
        assert rel_error(built(*package.inputs(8, 128)), reference) < 1e-4, mode


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("nope", "unknown model 'nope'"),
        ("missing.py:make", "no such model factory file"),
        ("{dir}", "is not a BERT checkpoint folder: no config.json"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         src: str, message: str) -> None:  # fmt: skip
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["protect", src.format(dir=empty), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[0] and len(err) <= 2  # the error, then its hint
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_a_checkpoint_folder_is_a_source(tmp_path: Path) -> None:
    """A BERT checkpoint written the Hugging Face way (names, config) is read back exactly."""
    from safetensors.torch import save_file

    from groupcover.models.minilm import model_dir

    vocab = 30522  # the real tokenizer's ids
    model, _ = load_model("bert-base", 0, **{**SMALL_BERT, "vocab_size": vocab})
    encoder = model
    raw: dict[str, torch.Tensor] = {}
    state = encoder.state_dict()
    raw["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"]
    raw["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"]
    raw["embeddings.token_type_embeddings.weight"] = state[
        "embeddings.token_type_embeddings.weight"
    ]
    raw["embeddings.LayerNorm.weight"] = state["embeddings.norm.weight"]
    raw["embeddings.LayerNorm.bias"] = state["embeddings.norm.bias"]
    renames = {"attention.out": "attention.output.dense",
               "attention_norm": "attention.output.LayerNorm", "ffn1": "intermediate.dense",
               "ffn2": "output.dense", "norm": "output.LayerNorm"}  # fmt: skip
    hidden = SMALL_BERT["hidden"]
    for i in range(SMALL_BERT["layers"]):
        for part in ("weight", "bias"):
            qkv = state[f"layer.{i}.attention.qkv.{part}"]
            for j, name in enumerate(("query", "key", "value")):
                raw[f"encoder.layer.{i}.attention.self.{name}.{part}"] = qkv[
                    j * hidden : (j + 1) * hidden
                ].clone()
            for ours, theirs in renames.items():
                raw[f"encoder.layer.{i}.{theirs}.{part}"] = state[f"layer.{i}.{ours}.{part}"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in raw.items()}, str(folder / "model.safetensors"))
    config = {"vocab_size": vocab, "hidden_size": hidden,
              "num_hidden_layers": SMALL_BERT["layers"], "num_attention_heads": SMALL_BERT["heads"],
              "intermediate_size": SMALL_BERT["intermediate"], "max_position_embeddings": 512,
              "type_vocab_size": 2, "layer_norm_eps": 1e-12}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    try:
        shutil.copy(model_dir() / "tokenizer.json", folder / "tokenizer.json")
    except Exception:
        pytest.skip("no tokenizer.json to borrow")
    out = tmp_path / "pkg"
    protect(str(folder), out, ProtectOptions(references=((2, 12),)))
    package = unsealed(out)
    inputs = package.inputs(2, 12)
    assert package.spec.kind == "sentence-bert" and package.spec.tokenizer is not None
    built = package.build("hardened-nomask", InProcessTransport(owner="x"))
    assert rel_error(built(*inputs), package.reference(2, 12)) < 1e-4


def test_fast_hardened_obfuscation_publishes_the_schemes_values() -> None:
    """The structured inverses give A^-1 W B^-1 as dense solves with the drawn transforms do."""
    scheme = HardenedScheme()
    for shape in ((48, 16), (16, 48), (8, 4, 3, 3)):
        weight = torch.randn(*shape)
        fast, secret = scheme.obfuscate(weight, None, SecretRandom.create(7))
        a, b = secret.outputs.dense(), secret.inputs.dense()  # type: ignore[attr-defined]
        last = weight.double().movedim(1, -1)
        wb = torch.linalg.solve(b.t(), last.reshape(-1, shape[1]).t()).t()
        w = wb.reshape(last.shape).movedim(-1, 1)
        slow = torch.linalg.solve(a, w.reshape(shape[0], -1)).reshape(w.shape).float()
        assert rel_error(fast, slow) < 1e-6


def test_bounded_mask_pool_draws_the_rest_online(tmp_path: Path) -> None:
    path = make_package(tmp_path)
    reference, inputs = plaintext()
    package = unsealed(path)
    layers = 4 * SMALL_BERT["layers"]
    unbounded = package.build("hardened", InProcessTransport(owner="a"), example=inputs)
    full = unbounded.masks.stats()["held_bytes"]
    bounded = package.build("hardened", InProcessTransport(owner="b"), example=inputs,
                            mask_budget=full // 3)  # fmt: skip
    stats = bounded.masks.stats()
    assert 0 < stats["held_bytes"] <= full // 3 and stats["not_drawn_ahead"] > 0
    assert rel_error(bounded(*inputs), reference) < 1e-4
    assert bounded.masks.stats()["online_refill"]["pairs"] > 0
    assert bounded.top_up_masks(1)
    assert bounded.masks.stats()["peak_held_bytes"] <= full // 3
    assert unbounded.masks.stats()["left"] == layers


def test_gcvm_model_protect_runs_the_framework(tmp_path: Path) -> None:
    """`gcvm model protect` starts `python -m groupcover protect` (the orchestrator never imports
    the framework) and passes its exit code on."""
    import subprocess
    import sys

    from orchestrator.model import protect_argv

    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "pkg"
    argv = protect_argv(f"{factory}:make", out, None, tmp_path / "k.key", None, True, None, 1, 1)
    assert argv[1:4] == ["-m", "groupcover", "protect"] and "--baselines" in argv
    gcvm = [sys.executable, "-m", "orchestrator", "model", "protect", f"{factory}:make",
            "--out", str(out), "--key-out", str(tmp_path / "k.key"), "--seed", "1"]  # fmt: skip
    done = subprocess.run(gcvm, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert not (out / "model.key").exists() and (tmp_path / "k.key").stat().st_size == 32
    bad = subprocess.run([*gcvm[:5], "nope", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr


def test_a_package_with_baselines_can_be_audited(tmp_path: Path) -> None:
    path = make_package(tmp_path, baselines=True)
    settings = RankSettings(Role.master, 0, 2, worker=1, model=str(path),
                            modes=("plain-offload", "hardened"), batch=2, seq=16,
                            key_file=path / "model.key")  # fmt: skip
    prepared = prepare(settings.model_request())
    plain, hardened = benchmark(
        prepared, settings.modes, lambda mode: InProcessTransport(owner=mode), model_name="x",
        batch=2, seq=16, repeat=1, warmup=0, seed=None, audit=True,
    )  # fmt: skip
    assert plain["audit"]["leaks"] and hardened["audit"]["leaks"] == []
    assert hardened["rel_err"] < 1e-4


def test_results_name_the_model_not_the_folder_it_was_copied_to(tmp_path: Path) -> None:
    """A VM's master runs /var/lib/gcvm/packages/<id>: its results still say "minilm"-style
    names (the manifest's), which the orchestrator's tables group by."""
    from groupcover.launch import RankSettings, Role

    pkg = make_package(tmp_path)
    name = json.loads((pkg / "manifest.json").read_text())["model"]["name"]
    settings = RankSettings(role=Role.master, rank=0, world_size=2, worker=1, model=str(pkg),
                            modes=("hardened-nomask",), batch=2, seq=16,
                            key_file=pkg / "model.key")  # fmt: skip
    prepared = prepare(settings.model_request())
    try:
        assert prepared.model_name == name and name not in ("", str(pkg))
    finally:
        prepared.close()


def test_the_publish_audit_is_made_at_protect_time(tmp_path: Path, monkeypatch) -> None:
    """protect --baselines seals the publish checks' verdicts: the master's audit takes them
    (no check repeated) and still reports a leak that protect found."""
    clean = make_package(tmp_path, baselines=True)
    original = HardenedScheme.obfuscate

    def leaky(self, weight, bias, rng):  # a scheme that publishes the plaintext
        _, secret = original(self, weight, bias, rng)
        return weight.detach().clone(), secret

    monkeypatch.setattr(HardenedScheme, "obfuscate", leaky)
    leaking = protect_source(small_bert()[1], tmp_path / "leaky",
                             ProtectOptions(scheme="hardened", baselines=True,
                                            references=((2, 16),)))  # fmt: skip
    assert leaking["layers"]
    monkeypatch.setattr(HardenedScheme, "obfuscate", original)
    reports = {}
    for path in (clean, tmp_path / "leaky"):
        settings = RankSettings(Role.master, 0, 2, worker=1, model=str(path), modes=("hardened",),
                                batch=2, seq=16, key_file=path / "model.key")  # fmt: skip
        prepared = prepare(settings.model_request())
        (result,) = benchmark(
            prepared, settings.modes, lambda mode: InProcessTransport(owner=mode), model_name="x",
            batch=2, seq=16, repeat=1, warmup=0, seed=None, audit=True,
        )  # fmt: skip
        reports[path] = result["audit"]
    layers = len(json.loads((clean / "manifest.json").read_text())["layers"])
    assert reports[clean]["leaks"] == [] and reports[clean]["publish_verdicts_taken"] == layers
    leaked = reports[tmp_path / "leaky"]
    assert leaked["publish_verdicts_taken"] == layers
    assert any("published weight equals the plaintext weight" in m for m in leaked["leaks"])
