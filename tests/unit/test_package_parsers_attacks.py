"""Hostile package files: whatever the host (or anyone with the package's folder) writes into
manifest.json, published.safetensors or master.sealed, every reader answers with one line and
allocates no more than the file's own size; never a traceback, never a MemoryError.

The master's path (`open_package(DIR).unseal(key)`) and the worker's (`launch --role worker
--package DIR`) share the readers, so each hostile file goes through both.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from groupcover.__main__ import main
from groupcover.errors import GroupCoverError
from groupcover.package.build import ProtectOptions, protect
from groupcover.package.keys import read_key
from groupcover.package.layout import PackageError
from groupcover.package.runtime import open_package

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

def make():
    torch.manual_seed(0)
    return Net(), (torch.randn(4, 16),)
"""


# ---- manifest.json and published.safetensors: master and worker ------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("factory")
    (tmp / "factory.py").write_text(FACTORY)
    out = tmp / "pkg"
    protect(f"{tmp / 'factory.py'}:make", out, ProtectOptions(references=()))
    return out


def published_file(header: object, data: bytes = b"", *, raw: bytes | None = None,
                   length: int | None = None) -> bytes:  # fmt: skip
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _meta(package: Path) -> dict[str, str]:
    manifest = json.loads((package / "manifest.json").read_text())
    return {"format": "gcvm-published-1", "package_id": manifest["package_id"]}


def tensor(shape: list[object], start: int = 0, end: int = 16, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


HOSTILE_PUBLISHED = {
    "metadata-is-a-list": lambda m: published_file({"__metadata__": [1, 2]}),
    "metadata-is-a-string": lambda m: published_file({"__metadata__": "x"}),
    "negative-dimensions": lambda m: published_file(
        {"__metadata__": m, "0": tensor([-1, -4])}, bytes(16)),
    "product-overflows-int64": lambda m: published_file(
        {"__metadata__": m, "0": tensor([1 << 62, 4], 0, 0)}),
    "dimension-past-int64": lambda m: published_file(
        {"__metadata__": m, "0": tensor([1 << 70], 0, 16)}, bytes(16)),
    "infinite-dimension": lambda m: published_file(
        {}, bytes(16), raw=b'{"0":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}}'),
    "shape-does-not-match-data": lambda m: published_file(
        {"__metadata__": m, "0": tensor([3, 4])}, bytes(16)),
    "offsets-backwards": lambda m: published_file(
        {"__metadata__": m, "0": tensor([4], 16, 0)}, bytes(16)),
    "boolean-dimension": lambda m: published_file(
        {"__metadata__": m, "0": tensor([True, 4])}, bytes(16)),
    "entry-is-a-list": lambda m: published_file({"__metadata__": m, "0": [1]}),
    "header-length-2^63": lambda m: published_file({"__metadata__": m}, length=1 << 63),
    "header-length-past-the-file": lambda m: published_file({"__metadata__": m}, length=1 << 20),
    "header-not-utf8": lambda m: published_file({}, raw=b'{"\xff\xfe":1}'),
    "header-deeply-nested": lambda m: published_file({}, raw=b"[" * 100_000),
    "header-not-an-object": lambda m: published_file({}, raw=b"[1]"),
}  # fmt: skip

HOSTILE_MANIFEST = {
    "deeply-nested": b"[" * 100_000,
    "deeply-nested-object": b'{"a":' * 100_000,
    "not-utf8": b'{"format": 1, "\xff": 2}',
    "modes-not-a-list": json.dumps({"format": 1, "modes": 5, "package_id": "x"}).encode(),
}


def _hostile(package: Path, tmp: Path, published: bytes | None = None,
             manifest: bytes | None = None) -> Path:  # fmt: skip
    copy = tmp / "copy"
    shutil.copytree(package, copy)
    if published is not None:
        (copy / "published.safetensors").write_bytes(published)
    if manifest is not None:
        (copy / "manifest.json").write_bytes(manifest)
    return copy


def _master_refuses(folder: Path) -> GroupCoverError:
    with pytest.raises(PackageError) as info:
        files = open_package(folder)
        files.check_modes(["hardened"])
        files.unseal(read_key(folder / "model.key"))
    assert "\n" not in str(info.value) and str(info.value)
    return info.value


def _worker_refuses(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    argv = ["launch", "--role", "worker", "--rank", "1", "--world-size", "2", "--master-addr",
            "127.0.0.1", "--master-port", "29999", "--package", str(folder)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("groupcover: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("case", sorted(HOSTILE_PUBLISHED))
def test_a_hostile_published_file_is_one_line(
    package: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _hostile(package, tmp_path, published=HOSTILE_PUBLISHED[case](_meta(package)))
    _master_refuses(folder)
    assert "published.safetensors" in _worker_refuses(folder, capsys)
    # the weights file given on its own to the worker: the same answer
    assert "published.safetensors" in _worker_refuses(folder / "published.safetensors", capsys)


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFEST))
def test_a_hostile_manifest_is_one_line(package: Path, tmp_path: Path, case: str) -> None:
    folder = _hostile(package, tmp_path, manifest=HOSTILE_MANIFEST[case])
    assert "manifest.json" in str(_master_refuses(folder))


def test_the_library_refuses_what_the_reader_refuses(package: Path, tmp_path: Path) -> None:
    """What `safetensors` itself says of the same files: the reader is no more lenient."""
    from safetensors import safe_open

    for case in ("negative-dimensions", "shape-does-not-match-data", "header-not-utf8",
                 "header-length-past-the-file", "metadata-is-a-list"):  # fmt: skip
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(HOSTILE_PUBLISHED[case](_meta(package)))
        # the library's own error classes vary (SafetensorError, ValueError...)
        with pytest.raises(Exception), safe_open(str(path), framework="pt") as f:  # noqa: B017
            [f.get_tensor(name) for name in f.keys()]  # noqa: SIM118 (not a dict)


def test_an_untouched_package_still_opens(package: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from groupcover.package.signature import sign_package

    folder = _hostile(package, tmp_path)
    owner = Ed25519PrivateKey.generate()  # its model code runs only from a signed package
    sign_package(folder, owner)
    files = open_package(folder)
    files.verify(owner.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    unsealed = files.unseal(read_key(folder / "model.key"))
    assert set(unsealed.published.entries) == {"0", "1"}


@pytest.mark.parametrize("case", ["deeply-nested", "not-utf8"])
def test_the_orchestrator_reads_a_hostile_manifest_in_one_line(package: Path, tmp_path: Path,
                                                               case: str) -> None:  # fmt: skip
    from orchestrator.errors import UsageError as OrchestratorUsageError
    from orchestrator.packages import load_package

    folder = _hostile(package, tmp_path, manifest=HOSTILE_MANIFEST[case])
    with pytest.raises(OrchestratorUsageError, match="is not JSON"):
        load_package(folder)
