"""`gcvm scan`: a planted plaintext tensor is found and named, in any of the three dtypes, as a
row or a column, at an unaligned offset, in raw files and in qcow2 images and overlays; clean
files, obfuscated weights and a protected package are clean; bad input is one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from orchestrator import scan as S
from orchestrator.scan import index as scan_index
from orchestrator.scan import stream

HIDDEN, INTER, LAYERS = 64, 128, 2
QEMU = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                          reason="qemu-img/qemu-io not installed")  # fmt: skip


def hf_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small BERT checkpoint in Hugging Face names (MiniLM's vocabulary, random weights)."""
    f = np.float32
    state = {
        "embeddings.word_embeddings.weight": rng.normal(0, 0.02, (30522, HIDDEN)).astype(f),
        "embeddings.position_embeddings.weight": rng.normal(0, 0.02, (64, HIDDEN)).astype(f),
        "embeddings.token_type_embeddings.weight": rng.normal(0, 0.02, (2, HIDDEN)).astype(f),
        "embeddings.LayerNorm.weight": np.ones(HIDDEN, f),
        "embeddings.LayerNorm.bias": np.zeros(HIDDEN, f),
    }
    shapes = {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
              "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
              "intermediate.dense": (INTER, HIDDEN), "output.dense": (HIDDEN, INTER)}  # fmt: skip
    for i in range(LAYERS):
        for name, (rows, cols) in shapes.items():
            state[f"encoder.layer.{i}.{name}.weight"] = rng.normal(0, 0.05, (rows, cols)).astype(f)
            state[f"encoder.layer.{i}.{name}.bias"] = rng.normal(0, 0.05, rows).astype(f)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[f"encoder.layer.{i}.{norm}.weight"] = np.ones(HIDDEN, f)
            state[f"encoder.layer.{i}.{norm}.bias"] = np.zeros(HIDDEN, f)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("owner") / "secret-bert"
    folder.mkdir()
    save_file(hf_state(np.random.default_rng(1)), str(folder / "model.safetensors"))
    config = {"vocab_size": 30522, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": 4, "intermediate_size": INTER,
              "max_position_embeddings": 64, "type_vocab_size": 2,
              "layer_norm_eps": 1e-12}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    from groupcover.models.minilm import model_dir

    shutil.copyfile(model_dir() / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    return S.read_safetensors(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def index(weights: dict[str, np.ndarray]) -> S.Index:
    return S.build_index(S.select_targets(weights))


def bf16(values: np.ndarray) -> bytes:
    return S.as_dtype_bytes(values[None, :], "bfloat16").tobytes()


def planted(weights: dict[str, np.ndarray]) -> tuple[bytes, dict[int, tuple[str, str, int, str]]]:
    """Random bytes with a float32 row, a bfloat16 column and a float16 row, unaligned."""
    rng = np.random.default_rng(7)
    data = bytearray(rng.bytes(3_000_000))
    q = weights["encoder.layer.1.attention.self.query.weight"]
    ffn = weights["encoder.layer.0.intermediate.dense.weight"]
    out = weights["encoder.layer.1.output.dense.weight"]
    plants = {
        100_003: (q[5].astype("<f4").tobytes(), ("encoder.layer.1.attention.self.query.weight",
                                                 "row", 5, "float32")),
        1_234_567: (bf16(ffn[:, 9]), ("encoder.layer.0.intermediate.dense.weight", "column", 9,
                                      "bfloat16")),
        2_500_001: (out[17].astype("<f2").tobytes(), ("encoder.layer.1.output.dense.weight",
                                                      "row", 17, "float16")),
    }  # fmt: skip
    for offset, (blob, _) in plants.items():
        data[offset : offset + len(blob)] = blob
    return bytes(data), {offset: what for offset, (_, what) in plants.items()}


def named(hits: list[S.Hit]) -> dict[int, tuple[str, str, int, str]]:
    return {h.offset: (h.tensor, h.orientation, h.index, h.dtype) for h in hits}


def test_planted_rows_and_columns_are_found_and_named(
    tmp_path: Path, weights: dict[str, np.ndarray], index: S.Index
) -> None:
    data, expected = planted(weights)
    target = tmp_path / "disk.bin"
    target.write_bytes(data)
    hits, scanned = S.scan_file(target, index)
    assert named(hits) == expected
    assert all(h.file == str(target) and h.view == "raw" and h.matched == h.length for h in hits)
    assert scanned[0].bytes == len(data)
    # across read chunks: a small chunk puts the plants on chunk boundaries
    for chunk in (4096, 1 << 16):
        old, stream.CHUNK = stream.CHUNK, chunk
        try:
            assert named(S.scan_file(target, index)[0]) == expected
        finally:
            stream.CHUNK = old


def test_a_whole_tensor_and_its_transpose(tmp_path: Path, weights: dict[str, np.ndarray],
                                          index: S.Index) -> None:  # fmt: skip
    w = weights["encoder.layer.0.attention.output.dense.weight"]
    target = tmp_path / "t.bin"
    target.write_bytes(b"x" * 5 + w.astype("<f2").tobytes() + b"y" * 3 + w.T.copy().tobytes())
    hits = S.scan_file(target, index)[0]
    rows = {h.index for h in hits if h.orientation == "row" and h.dtype == "float16"}
    cols = {h.index for h in hits if h.orientation == "column" and h.dtype == "float32"}
    assert rows == set(range(HIDDEN)) and cols == set(range(HIDDEN))
    groups = S.Report("ck", 1, 1, 1, [], hits, 0.0).groups()
    assert {(g["orientation"], g["dtype"], g["vectors_found"]) for g in groups} == {
        ("row", "float16", HIDDEN), ("column", "float32", HIDDEN)}  # fmt: skip


def test_a_partial_row_is_found_but_a_short_or_perturbed_one_is_not(
    tmp_path: Path, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # fingerprints every 128 bytes: pieces >= 152 found
    monkeypatch.setattr(scan_index, "ANCHOR", 128)
    name = "encoder.layer.0.intermediate.dense.weight"
    index = S.build_index({name: weights[name]})
    column = weights[name].T[3].astype("<f4").tobytes()
    assert len(column) == INTER * 4
    near = (weights[name][:, 2] * np.float32(1.001)).astype("<f4")
    target = tmp_path / "p.bin"
    target.write_bytes(b"\x01" * 11 + column[100 : 100 + 200] + b"\x02" * 13 + column[:40]
                       + b"\x03" + near.tobytes())  # fmt: skip
    hits = S.scan_file(target, index)[0]
    assert [(h.tensor, h.orientation, h.index, h.matched, h.offset) for h in hits] == [
        (name, "column", 3, 200, 11 - 100)]  # fmt: skip


def test_clean_random_and_obfuscated_files(tmp_path: Path, weights: dict[str, np.ndarray],
                                           index: S.Index) -> None:  # fmt: skip
    rng = np.random.default_rng(3)
    clean = tmp_path / "random.bin"
    clean.write_bytes(rng.bytes(2_000_000) + bytes(1_000_000) + b"\xff" * 100_000)
    assert S.scan_file(clean, index)[0] == []
    published = {}
    for name, w in weights.items():
        if w.ndim == 2 and "embeddings" not in name:  # A W B, as a scheme publishes it
            a = np.linalg.qr(rng.normal(size=(w.shape[0], w.shape[0])))[0]
            b = np.linalg.qr(rng.normal(size=(w.shape[1], w.shape[1])))[0]
            published[name] = (a @ w @ b).astype(np.float32)
    save_file(published, str(tmp_path / "published.safetensors"))
    assert S.scan_file(tmp_path / "published.safetensors", index)[0] == []


def test_a_protected_package_is_clean_and_its_source_is_not(tmp_path: Path, checkpoint: Path,
                                                            index: S.Index) -> None:  # fmt: skip
    package = tmp_path / "pkg"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "groupcover", "protect", str(checkpoint),
                           "--out", str(package), "--reference", "2x16", "--baselines"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in package.iterdir()}
    assert {"published.safetensors", "master.sealed", "manifest.json"} <= files
    report = S.scan(checkpoint, [package])
    assert report.clean, report.groups()
    assert {Path(s.file).name for s in report.scanned} == files
    source = S.scan(checkpoint, [checkpoint / "model.safetensors"])
    assert not source.clean and {g["tensor"] for g in source.groups()} == set(index.targets)


def qemu(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@QEMU
def test_qcow2_images_and_overlays(tmp_path: Path, weights: dict[str, np.ndarray],
                                   index: S.Index) -> None:  # fmt: skip
    data, expected = planted(weights)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data + bytes(4 << 20))
    base = tmp_path / "base.qcow2"
    qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    hits = S.scan_file(base, index)[0]
    assert named([h for h in hits if h.view == "guest"]) == expected
    assert {h.view for h in hits} == {"raw", "guest"}
    # compressed: the raw bytes show nothing, the guest view (qemu-img convert) does
    sparse = bytearray(len(data))  # zeros compress: every cluster is stored compressed
    for offset in expected:
        sparse[offset : offset + 1024] = data[offset : offset + 1024]
    raw.write_bytes(sparse)
    packed = tmp_path / "packed.qcow2"
    qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(packed))
    hits, scanned = S.scan_file(packed, index)
    assert {h.view for h in hits} == {"guest"} and named(hits) == expected
    assert "convert" in scanned[-1].note
    # an overlay over a clean base: the tensor written through the overlay is found in it
    clean = tmp_path / "clean.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(clean), "8M")
    overlay = tmp_path / "vm.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(clean), str(overlay))
    row = weights["encoder.layer.1.attention.self.value.weight"][2].astype("<f4").tobytes()
    blob = tmp_path / "row.bin"
    blob.write_bytes(row)
    qemu("qemu-io", "-f", "qcow2", "-c", f"write -s {blob} 1048579 {len(row)}", str(overlay))
    assert S.scan_file(clean, index)[0] == []
    found = {(h.view, h.offset if h.view == "guest" else 0, h.tensor, h.index)
             for h in S.scan_file(overlay, index)[0]}  # fmt: skip
    assert ("guest", 1048579, "encoder.layer.1.attention.self.value.weight", 2) in found
    assert any(view == "raw" for view, *_ in found)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "scan", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "COLUMNS": "200"}  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_cli_exit_codes_json_and_bad_input(tmp_path: Path, checkpoint: Path,
                                           weights: dict[str, np.ndarray]) -> None:  # fmt: skip
    data, _ = planted(weights)
    (tmp_path / "hit.bin").write_bytes(data)
    (tmp_path / "clean.bin").write_bytes(np.random.default_rng(2).bytes(100_000))
    hit = run_cli("--model", str(checkpoint), "--paths", str(tmp_path / "clean.bin"),
                  str(tmp_path / "hit.bin"), "--json")  # fmt: skip
    assert hit.returncode == 1, hit.stderr
    document = json.loads(hit.stdout)
    assert not document["clean"] and len(document["hits"]) == 3
    assert {Path(s["file"]).name for s in document["scanned"]} == {"clean.bin", "hit.bin"}
    clean = run_cli("--model", str(checkpoint / "model.safetensors"), "--paths",
                    str(tmp_path / "clean.bin"))  # fmt: skip
    assert clean.returncode == 0 and "clean: no plaintext tensor found" in clean.stdout
    (tmp_path / "empty").mkdir()
    (tmp_path / "bogus.safetensors").write_bytes(b"\xff" * 40)
    bad = {
        "no such checkpoint": ("--model", str(tmp_path / "nope"), "--paths", str(tmp_path)),
        "holds no model.safetensors": ("--model", str(tmp_path / "empty"), "--paths",
                                       str(tmp_path)),
        "is not a safetensors file": ("--model", str(tmp_path / "bogus.safetensors"),
                                      "--paths", str(tmp_path)),
        "no such file or folder": ("--model", str(checkpoint), "--paths", str(tmp_path / "x")),
        "not a regular expression": ("--model", str(checkpoint), "--tensors", "(",
                                     "--paths", str(tmp_path)),
        "no tensor of the checkpoint": ("--model", str(checkpoint), "--tensors", "^nothing$",
                                        "--paths", str(tmp_path)),
        "nothing to scan": ("--model", str(checkpoint)),
    }  # fmt: skip
    for message, args in bad.items():
        proc = run_cli(*args)
        assert proc.returncode == 2, (message, proc.stdout, proc.stderr)
        text = proc.stdout + proc.stderr
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in text, message


def test_host_files_lists_what_gcvm_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import paths, state
    from orchestrator.spec import Tee

    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GCVM_CACHE", raising=False)
    image = paths.images_dir() / "abc"
    image.mkdir(parents=True)
    (image / "disk.qcow2").write_bytes(b"QFI\xfb")
    cluster = state.cluster_dir("c1")
    (cluster / "vms").mkdir(parents=True)
    overlay = cluster / "vms" / "master.qcow2"
    overlay.write_bytes(b"QFI\xfb")
    results = paths.state_root() / "results" / "c1" / "run1"
    results.mkdir(parents=True)
    (results / "bench.json").write_text("{}")
    vm = state.VmState("master", "master", 0, 0, "10.0.0.2", "52:54:00:00:00:01", Tee.none, 1,
                       2048, disk=str(overlay))  # fmt: skip
    st = state.ClusterState("c1", {}, "qemu:///system", None, "gcvm-c1", True,
                            cluster / "id_ed25519", cluster / "known_hosts",
                            image={"disk": str(image / "disk.qcow2"), "python": "/usr/bin/python3"},
                            vms=[vm])  # fmt: skip
    state.save(st)
    (cluster / "hostworker").mkdir()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    record = {"dir": str(cluster / "hostworker"), "root": str(checkout), "python": sys.executable}
    owner = paths.state_root() / "owner" / "c1"  # the checkpoint, keys, broker: the owner's
    (owner / "minilm-standin").mkdir(parents=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text("{}")
    broker = {"owner": str(owner), "address": "10.0.0.1", "netns": "gcvm-c1",
              "policy": str(policy), "pid": 1, "url": "http://h:1", "started": 0.0}  # fmt: skip
    state.save(dataclasses.replace(st, host_worker=record, broker=broker))
    listed = S.host_files("c1")
    assert cluster in listed and paths.state_root() / "results" / "c1" in listed
    assert image / "disk.qcow2" in listed and image in listed
    assert checkout not in listed and Path(sys.executable) not in listed
    assert not [p for p in listed if p == policy or p.is_relative_to(owner)]
    files = S.expand(listed)
    assert {overlay, results / "bench.json", image / "disk.qcow2", state.state_path("c1")} <= set(
        files
    )
