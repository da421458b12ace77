"""Who made a package: the owner's signature, checked by the master before it asks for the key.

The attacker is the host: it controls the package folder a master opens (and the key file given
on an unmeasured command line). Its strongest move is a package of its own, sealed under its own
key, whose bundle holds a `FILE.py:FUNCTION` factory: the master would exec() that code. Each test
below is one thing the host tries; a real small BERT package (module-scoped) is the victim.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from groupcover import trust
from groupcover.__main__ import main
from groupcover.inprocess import InProcessTransport
from groupcover.launch import RankSettings, Role
from groupcover.models import MODELS, ModelFactory, load_model
from groupcover.package import prepare as prepare_module
from groupcover.package import runtime
from groupcover.package.build import ProtectOptions, protect, protect_source
from groupcover.package.keys import read_key
from groupcover.package.layout import PackageError
from groupcover.package.prepare import ModelRequest, prepare
from groupcover.package.runtime import open_package
from groupcover.package.seal import SealError, open_file, seal_file
from groupcover.package.signature import (
    SignatureError,
    canonical,
    generate_owner_key,
    load_signing_key,
    sign_package,
)
from groupcover.package.source import ModelSpec, Source
from tests.unit.conftest import SMALL_BERT, rel_error

MARKER_ENV = "GCVM_SIGNATURE_TEST_MARKER"
# The red team's factory: its module-level code writes a marker file whenever it is executed
# (the path comes from the environment, so protecting it writes nothing).
EVIL_FACTORY = f"""
import os
import torch
from torch import nn

_marker = os.environ.get({MARKER_ENV!r})
if _marker:
    with open(_marker, "w") as f:
        f.write("package code ran in the master")

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (torch.randn(4, 16),)
"""


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclasses.dataclass
class World:
    owner: Ed25519PrivateKey
    owner_pub: Path  # PEM, what --owner-key takes
    attacker: Ed25519PrivateKey
    genuine: Path  # small BERT, baselines, signed by the owner
    evil: Path  # the red team's factory package, sealed under its own key, signed by attacker
    evil_owner_signed: Path  # the same factory, signed by the owner (the positive control)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("signature")
    private, public, _ = generate_owner_key(tmp / "owner")
    owner = load_signing_key(private)
    attacker = Ed25519PrivateKey.generate()
    model, _ = load_model("bert-base", 0, **SMALL_BERT)
    source = Source(model, ModelSpec("bert", dataclasses.asdict(model.config), "small-bert"))
    genuine = tmp / "genuine"
    protect_source(source, genuine, ProtectOptions(baselines=True, references=((2, 16),),
                                                   signer=owner))  # fmt: skip
    factory = tmp / "evil.py"
    factory.write_text(EVIL_FACTORY)
    os.environ.pop(MARKER_ENV, None)
    evil = tmp / "evil"
    protect(f"{factory}:make", evil, ProtectOptions(signer=attacker))
    evil_owner_signed = tmp / "evil-owner-signed"
    protect(f"{factory}:make", evil_owner_signed, ProtectOptions(signer=owner))
    return World(owner, public, attacker, genuine, evil, evil_owner_signed)


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "package-code-ran"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any use of the key source, or any decryption, fails the test: refusals come first."""

    def never(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the key was asked for, or a sealed byte decrypted, before refusal")

    monkeypatch.setattr(prepare_module, "obtain_key", never)
    monkeypatch.setattr(runtime, "open_file_into", never)


def copy(package: Path, tmp: Path) -> Path:
    out = tmp / f"copy-{package.name}"
    shutil.copytree(package, out)
    return out


def request(package: Path, owner: bytes | None, key_file: Path | None = None,
            modes: tuple[str, ...] = ("hardened",)) -> ModelRequest:  # fmt: skip
    pins = trust.Pins(owner_key=owner, source=trust.GIVEN) if owner else trust.Pins()
    return ModelRequest(models=(str(package),), modes=modes, batch=2, seq=16,
                        key_files=(key_file or package / "model.key",), pins=pins)  # fmt: skip


def run(prepared: Any, mode: str = "hardened") -> torch.Tensor:
    built = prepared.packages[mode].build(mode, InProcessTransport(owner=mode))
    return built(*prepared.inputs)


def refused(world: World, package: Path, tmp: Path) -> str:
    """Opens `package` with the owner pinned and a key file that does not exist: the refusal
    must come before the key is read (and `no_key` fails any key use or decryption)."""
    with pytest.raises(PackageError) as caught:
        prepare(request(package, raw(world.owner), key_file=tmp / "no-such.key"))
    return caught.value.message


# ---- the genuine package ------------------------------------------------------------------------


def test_a_signed_package_opens_runs_and_its_facts_name_the_signer(world: World) -> None:
    prepared = prepare(request(world.genuine, raw(world.owner)))
    assert rel_error(run(prepared), prepared.reference) < 1e-4
    facts = prepared.key_release
    assert facts is not None and facts["package_signed_by"] == trust.b64url(raw(world.owner))
    assert facts["package_authenticated"] is True
    assert prepared.model_name == "small-bert"
    signed = json.loads((world.genuine / "signature.json").read_text())
    assert set(signed["statement"]["files"]) == {
        "manifest.json", "published.safetensors", "master.sealed", "baselines.sealed",
    }  # fmt: skip
    assert "model.key" not in json.dumps(signed)


def test_without_a_pin_results_say_the_package_was_not_authenticated(world: World) -> None:
    prepared = prepare(request(world.genuine, None))
    assert prepared.key_release is not None
    assert prepared.key_release["package_signed_by"] is None
    assert prepared.key_release["package_authenticated"] is False


def test_a_copy_without_baselines_still_verifies(world: World, tmp_path: Path) -> None:
    """The orchestrator copies baselines.sealed only where a baseline mode runs."""
    package = copy(world.genuine, tmp_path)
    (package / "baselines.sealed").unlink()
    prepared = prepare(request(package, raw(world.owner)))
    assert prepared.key_release is not None and prepared.key_release["package_authenticated"]


def test_baselines_are_hashed_again_as_they_are_decrypted(world: World, tmp_path: Path) -> None:
    """A file the host changes after the signature was checked is refused when it is read, even
    one that still decrypts: here the same plaintext sealed again under the same key."""
    package = copy(world.genuine, tmp_path)
    prepared = prepare(request(package, raw(world.owner), modes=("hardened", "tee-only")))
    key = read_key(package / "model.key")
    plaintext = open_file(package / "baselines.sealed", key)
    seal_file(package / "baselines.sealed", plaintext, key)  # new nonces: other bytes
    with pytest.raises(SealError, match="changed after its signature was checked"):
        run(prepared, "tee-only")


def test_a_sealed_file_swapped_after_verification_is_refused(world: World, tmp_path: Path) -> None:
    """Verified, then swapped for the attacker's bundle with the attacker's key (the key file is
    the host's): it decrypts, but it is not the file that was signed."""
    package = copy(world.genuine, tmp_path)
    files = open_package(package)
    files.verify(raw(world.owner))
    shutil.copy(world.evil / "master.sealed", package / "master.sealed")
    with pytest.raises(SealError, match="changed after its signature was checked"):
        files.unseal(read_key(world.evil / "model.key"))


# ---- refused before the key: unsigned, someone else's, altered ----------------------------------


@pytest.mark.usefixtures("no_key")
def test_an_unsigned_package_is_refused_with_an_owner_pin(world: World, tmp_path: Path) -> None:
    package = copy(world.genuine, tmp_path)
    (package / "signature.json").unlink()
    assert "is not signed" in refused(world, package, tmp_path)


@pytest.mark.usefixtures("no_key")
def test_a_package_signed_by_another_key_is_refused(world: World, tmp_path: Path) -> None:
    package = copy(world.genuine, tmp_path)
    sign_package(package, world.attacker)
    message = refused(world, package, tmp_path)
    assert trust.b64url(raw(world.attacker)) in message and "not by this master's" in message


@pytest.mark.usefixtures("no_key")
@pytest.mark.parametrize(
    "name", ["master.sealed", "manifest.json", "published.safetensors", "baselines.sealed"]
)
def test_a_changed_byte_in_any_signed_file_is_refused(
    world: World, tmp_path: Path, name: str
) -> None:
    package = copy(world.genuine, tmp_path)
    path = package / name
    data = bytearray(path.read_bytes())
    if name == "manifest.json":  # still JSON with the same values: only the bytes differ
        data[data.rindex(b"}") - 1 : data.rindex(b"}") - 1] = b" "
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert name in refused(world, package, tmp_path)


@pytest.mark.usefixtures("no_key")
def test_an_edited_statement_is_refused(world: World, tmp_path: Path) -> None:
    """The host changes the manifest and the statement's digest of it, keeping the signature."""
    package = copy(world.genuine, tmp_path)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["model"]["name"] = "someone-elses-model"
    (package / "manifest.json").write_text(json.dumps(manifest))
    signed = json.loads((package / "signature.json").read_text())
    import hashlib

    digest = hashlib.sha256((package / "manifest.json").read_bytes()).hexdigest()
    signed["statement"]["files"]["manifest.json"] = digest
    (package / "signature.json").write_text(json.dumps(signed))
    assert "does not verify" in refused(world, package, tmp_path)


@pytest.mark.usefixtures("no_key")
def test_a_file_the_statement_does_not_list_is_refused(world: World, tmp_path: Path) -> None:
    """Signed without baselines.sealed (the owner's signature is genuine), then the host adds
    one: every file that exists must be signed."""
    package = copy(world.genuine, tmp_path)
    aside = tmp_path / "baselines.sealed"
    shutil.move(package / "baselines.sealed", aside)
    signed = sign_package(package, world.owner)
    assert "baselines.sealed" not in signed["statement"]["files"]
    shutil.move(aside, package / "baselines.sealed")
    assert "does not cover" in refused(world, package, tmp_path)


@pytest.mark.usefixtures("no_key")
def test_a_malformed_signature_file_is_refused(world: World, tmp_path: Path) -> None:
    package = copy(world.genuine, tmp_path)
    signed = json.loads((package / "signature.json").read_text())
    signed["signature"] = signed["signature"][:-4]
    (package / "signature.json").write_text(json.dumps(signed))
    assert "does not verify" in refused(world, package, tmp_path)
    (package / "signature.json").write_text("not json")
    assert "is not JSON" in refused(world, package, tmp_path)


def test_the_statement_is_what_is_signed(world: World) -> None:
    signed = json.loads((world.genuine / "signature.json").read_text())
    assert signed["algorithm"] == "Ed25519"
    assert signed["public_key"] == trust.b64url(raw(world.owner))
    sig = trust._b64url_decode(signed["signature"], "signature")
    world.owner.public_key().verify(sig, canonical(signed["statement"]))


# ---- the red team: a package of the host's own, with code --------------------------------------


@pytest.mark.usefixtures("no_key")
def test_the_attackers_code_package_is_refused_under_the_owner_pin(
    world: World, tmp_path: Path, marker: Path
) -> None:
    message = refused(world, world.evil, tmp_path)
    assert "not by this master's owner key" in message
    assert not marker.exists()


def test_the_attackers_code_package_is_refused_without_a_pin(world: World, marker: Path) -> None:
    """No pin: nothing says who made it, so its code never runs (its own key file is given)."""
    with pytest.raises(SignatureError, match="carries model code") as caught:
        prepare(request(world.evil, None))
    assert "owner" in (caught.value.hint or "")
    assert not marker.exists()


@pytest.mark.parametrize("pinned", [True, False])
def test_a_master_refuses_it_in_one_line(
    world: World, marker: Path, pinned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`launch --role master` prepares its model before joining the world: the refusal is one
    line (and a hint), a non-zero exit, no traceback, and the code never ran."""
    argv = ["launch", "--role", "master", "--rank", "0", "--world-size", "2", "--worker", "1",
            "--master-addr", "127.0.0.1", "--master-port", "1", "--model", str(world.evil),
            "--key-file", str(world.evil / "model.key"), "--modes", "hardened",
            "--batch", "2", "--seq", "16"]  # fmt: skip
    if pinned:
        argv += ["--owner-key", str(world.owner_pub)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("groupcover: error:")]
    assert len(errors) == 1
    assert ("not by this master's owner key" if pinned else "carries model code") in errors[0]
    assert not marker.exists()


def test_a_code_package_signed_by_the_pinned_owner_runs(world: World, marker: Path) -> None:
    """The positive control: the same factory, signed by the owner, opens and runs."""
    prepared = prepare(request(world.evil_owner_signed, raw(world.owner)))
    assert rel_error(run(prepared), prepared.reference) < 1e-4
    assert marker.exists()  # the owner's code ran, as the owner meant
    assert prepared.key_release is not None
    assert prepared.key_release["package_signed_by"] == trust.b64url(raw(world.owner))


# ---- a relabelled manifest: the sealed bundle is authoritative -------------------------------


def _scheme(m: dict[str, Any]) -> str:
    m["scheme"] = "groupcover"
    return "scheme"


def _modes(m: dict[str, Any]) -> str:
    m["modes"] = [*m["modes"], "groupcover"]
    return "modes"


def _shape(m: dict[str, Any]) -> str:
    m["layers"][1]["shape"] = [m["layers"][1]["shape"][0] // 2, m["layers"][1]["shape"][1]]
    return "layer 1 (shape)"


def _name(m: dict[str, Any]) -> str:
    m["model"]["name"] = "minilm"
    return "model"


def _baselines(m: dict[str, Any]) -> str:
    m["baselines"] = None
    return "baselines"


@pytest.mark.parametrize("edit", [_scheme, _modes, _shape, _name, _baselines])
@pytest.mark.parametrize("resigned", [True, False])
def test_a_relabelled_manifest_is_refused_even_when_re_signed(
    world: World, tmp_path: Path, edit: Any, resigned: bool
) -> None:
    package = copy(world.genuine, tmp_path)
    manifest = json.loads((package / "manifest.json").read_text())
    field = edit(manifest)
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if resigned:  # the owner's own key signs the lie: the bundle still disagrees
        sign_package(package, world.owner)
    else:
        (package / "signature.json").unlink()
    pin = raw(world.owner) if resigned else None
    with pytest.raises(PackageError, match="disagrees with the sealed bundle") as caught:
        prepare(request(package, pin))
    assert field in caught.value.message


# ---- where the pin comes from ----------------------------------------------------------------


def test_argv_cannot_replace_a_measured_owner_pin(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=/dev/vda {trust.cmdline_params(None, raw(world.attacker))}\n")
    monkeypatch.setattr(trust, "KERNEL_CMDLINE", cmdline)
    settings = RankSettings(Role.master, 0, 2, worker=1, model=str(world.genuine),
                            modes=("hardened",), batch=2, seq=16,
                            key_file=world.genuine / "model.key",
                            owner_key=world.owner_pub)  # fmt: skip
    with pytest.raises(trust.TrustError, match="differs from the owner key pinned"):
        settings.model_request()


def test_a_measured_owner_pin_is_enforced(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No argv at all: the measured pin alone refuses another owner's package and opens the
    owner's own."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(trust.cmdline_params(None, raw(world.owner)))
    monkeypatch.setattr(trust, "KERNEL_CMDLINE", cmdline)
    for package, ok in ((world.genuine, True), (world.evil, False)):
        settings = RankSettings(Role.master, 0, 2, worker=1, model=str(package),
                                modes=("hardened",), batch=2, seq=16,
                                key_file=package / "model.key")  # fmt: skip
        req = settings.model_request()
        assert req.pins.measured and req.pins.owner_key == raw(world.owner)
        if ok:
            assert prepare(req).key_release["package_authenticated"] is True  # type: ignore[index]
        else:
            with pytest.raises(SignatureError):
                prepare(req)


# ---- built-in names: protected by this very process --------------------------------------------


def test_a_built_in_name_is_authenticated_by_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(seed: int, **_: object) -> Any:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return model, lambda batch, seq: (torch.randn(batch, 8),)

    monkeypatch.setitem(MODELS, "tiny-signature-test", ModelFactory("tiny", build))
    prepared = prepare(ModelRequest(models=("tiny-signature-test",), modes=("hardened",),
                                    batch=2, seq=4))  # fmt: skip
    try:
        facts = prepared.key_release
        assert facts is not None and facts["source"] == "built-in"
        assert facts["package_authenticated"] is True and facts["package_signed_by"] is None
    finally:
        prepared.close()


# ---- the owner's side: the key pair, signing from the command line -----------------------------


def test_ownerkey_writes_a_private_key_only_the_owner_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["ownerkey", "--out", str(out)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE((out / "owner.key").stat().st_mode) == 0o600
    assert trust.read_owner_key(out / "owner.pub") == trust._b64url_decode(said["owner_key"], "k")
    assert trust.parse_cmdline(said["kernel_cmdline"]).owner_key == trust.read_owner_key(
        out / "owner.pub"
    )
    before = (out / "owner.key").read_bytes()
    assert main(["ownerkey", "--out", str(out)]) == 2  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    assert (out / "owner.key").read_bytes() == before


def test_sign_refuses_a_key_others_can_read(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, _ = generate_owner_key(tmp_path / "k")
    key = tmp_path / "k" / "owner.key"
    key.chmod(0o640)
    package = copy(world.genuine, tmp_path)
    (package / "signature.json").unlink()
    assert main(["sign", str(package), "--sign-key", str(key)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "open to group or others" in err[0] and f"chmod 600 {key}" in err[1]
    assert not (package / "signature.json").exists()
    key.chmod(0o600)
    assert main(["sign", str(package), "--sign-key", str(key)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["signed_by"] == trust.b64url(trust.read_owner_key(tmp_path / "k" / "owner.pub"))
    assert said["manifest_checked"] is True
    assert not [p for p in package.iterdir() if p.name.startswith(".")]  # no temporary left
    prepare(request(package, trust.read_owner_key(tmp_path / "k" / "owner.pub")))


def test_protect_sign_key_signs_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public, owner = generate_owner_key(tmp_path / "k")
    factory = tmp_path / "f.py"
    factory.write_text(EVIL_FACTORY)
    out = tmp_path / "pkg"
    assert main(["protect", f"{factory}:make", "--out", str(out), "--sign-key", str(private),
                 "--reference", "2x16"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["signed_by"] == trust.b64url(owner)
    assert (out / "signature.json").is_file() and (out / "model.key").is_file()
    prepare(request(out, trust.read_owner_key(public)))
    private.chmod(0o644)  # refused before any work
    assert main(["protect", f"{factory}:make", "--out", str(tmp_path / "p2"), "--sign-key",
                 str(private)]) == 2  # fmt: skip
    assert "chmod 600" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_the_orchestrator_copies_the_signature_to_a_master(world: World, tmp_path: Path) -> None:
    from orchestrator import packages
    from orchestrator.model import protect_argv

    given = packages.given_packages([world.genuine], [])[0]
    assert packages.copy_plan(given, "master", baselines=False)[-1] == "signature.json"
    assert "signature.json" not in packages.copy_plan(given, "worker", baselines=True)
    argv = protect_argv("minilm", tmp_path / "p", None, None, None, False, None, None, None,
                        tmp_path / "owner.key")  # fmt: skip
    assert argv[-2:] == ["--sign-key", str(tmp_path / "owner.key")]


def test_sign_checks_the_manifest_against_the_bundle(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The owner never vouches for a relabelled manifest: with the model key at hand, `sign`
    compares it with the sealed bundle first."""
    private, _, _ = generate_owner_key(tmp_path / "k")
    package = copy(world.genuine, tmp_path)
    (package / "signature.json").unlink()
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["scheme"] = "groupcover"
    (package / "manifest.json").write_text(json.dumps(manifest))
    assert main(["sign", str(package), "--sign-key", str(private)]) == 2
    assert "disagrees with the sealed bundle on scheme" in capsys.readouterr().err
    assert not (package / "signature.json").exists()
    shutil.move(package / "model.key", tmp_path / "model.key")  # no key: signed, with a warning
    assert main(["sign", str(package), "--sign-key", str(private)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["manifest_checked"] is False and "not checked" in err
