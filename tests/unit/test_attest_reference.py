"""Reference values: `gcvm attest policy` (image folder + SNP OVMF -> a pinned policy), the launch
digest against sev-snp-measure's published vectors, and policies that differ from the real
vectors of tests/fixtures/attestation in one pinned claim (refused) or match them (accepted)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import codedisk
from orchestrator.attest import snp, tdx
from orchestrator.attest.measure import snp_launch_digest
from orchestrator.attest.policy import load_policy, parse_policy, unpinned
from orchestrator.attest.reference import parse_min_tcb, reference_policy
from orchestrator.errors import UsageError
from orchestrator.image.build import boot_file_digests
from orchestrator.image.model import CMDLINE, METADATA
from tests.unit.attest_firmware import firmware_or_skip

FIX = Path(__file__).resolve().parents[1] / "fixtures"
VECTORS = FIX / "sev-snp-measure"
SNP = FIX / "attestation" / "snp"
TDX = FIX / "attestation" / "tdx"
TDX_NOW = 1750331763
VCEK_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


# --- the launch digest against sev-snp-measure's published vectors -------------------------------

PUBLISHED = [
    # vcpus, command line, guest features, digest (upstream tests/test_guest.py)
    (1, "console=ttyS0 loglevel=7", 0x21, "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb2"
     "8c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    (1, "console=ttyS0 loglevel=7", 0x1, "6d287813eb5222d770f75005c664e34c204f385ce832cc2c"
     "e7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
    (4, "", 0x21, "4953b1fb416fa874980e8442b3706d345926d5f38879134e"
     "00813c5d7abcbe78eafe7b422907be0b4698e2414a631942"),
    (4, "", 0x1, "5061fffb019493a903613d56d54b94912a1a2f9e4502385f"
     "5c194616753720a92441310ba6c4933de877c36e23046ad5"),
]  # fmt: skip


@pytest.mark.parametrize(("vcpus", "append", "features", "digest"), PUBLISHED)
def test_launch_digest_matches_sev_snp_measures_published_vectors(
    tmp_path: Path, vcpus: int, append: str, features: int, digest: str
) -> None:
    empty = tmp_path / "empty"  # upstream measures /dev/null as kernel and initrd
    empty.write_bytes(b"")
    got = snp_launch_digest(VECTORS / "ovmf_AmdSev_suffix.bin", empty, empty, append,
                            vcpus=vcpus, guest_features=features)  # fmt: skip
    assert got.hex() == digest


def test_an_ordinary_ovmf_is_refused_with_the_package_to_use(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "image")
    with pytest.raises(UsageError) as info:
        reference_policy(image, VECTORS / "ovmf_OvmfX64_suffix.bin", vcpus=1)
    assert "no kernel-hashes table" in info.value.message
    assert "SNP_KERNEL_HASHES" in info.value.message
    assert "ovmf-amdsev" in (info.value.hint or "")
    with pytest.raises(UsageError, match="no such file") as info:
        reference_policy(image, tmp_path / "OVMF.amdsev.fd", vcpus=1)
    assert "gcvm attest firmware" in (info.value.hint or "")


# --- gcvm attest policy on Debian's OVMF.amdsev.fd --------------------------------------------


def fake_image(root: Path, kernel: bytes = b"MZ" + bytes(8190), initrd: bytes = b"initrd" * 99,
               record: bool = True) -> Path:  # fmt: skip
    """An image folder as 'gcvm image build' leaves it, without the disk (not measured)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vmlinuz").write_bytes(kernel)
    (root / "initrd.img").write_bytes(initrd)
    meta = {
        "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": CMDLINE,
        "python": "/opt/gcvm/venv/bin/python", "recipe_hash": "0123456789abcdef",
        "size_bytes": 1, "built_seconds": 1.0, "kernel_version": "6.12.0-test",
        "tee_guest_support": {"sev-snp": True, "tdx": True},
        "files_sha256": boot_file_digests(root) if record else {},
    }  # fmt: skip
    (root / METADATA).write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def ovmf() -> Path:
    return firmware_or_skip("sev-snp")


def measurement(image: Path, ovmf: Path, **kw: Any) -> str:
    return reference_policy(image, ovmf, **{"vcpus": 1, **kw}).policy["snp"]["measurements"][0]


def test_digest_is_stable_and_moves_with_every_byte_and_vcpus(tmp_path: Path, ovmf: Path) -> None:
    kernel, initrd = b"MZ" + bytes(8190), b"initrd" * 99
    base_image = fake_image(tmp_path / "base", kernel, initrd)
    base = measurement(base_image, ovmf)
    assert len(bytes.fromhex(base)) == 48
    assert measurement(base_image, ovmf) == base  # stable
    assert measurement(fake_image(tmp_path / "b", kernel, initrd), ovmf) == base  # same bytes
    flipped = bytearray(kernel)
    flipped[4000] ^= 1
    assert measurement(fake_image(tmp_path / "k", bytes(flipped), initrd), ovmf) != base
    flipped = bytearray(initrd)
    flipped[-1] ^= 0x80
    assert measurement(fake_image(tmp_path / "i", kernel, bytes(flipped)), ovmf) != base
    assert measurement(base_image, ovmf, cmdline_extra="gcvm.owner_key=A") != base
    assert measurement(base_image, ovmf, cmdline_extra="gcvm.owner_key=B") != measurement(
        base_image, ovmf, cmdline_extra="gcvm.owner_key=A"
    )
    assert measurement(base_image, ovmf, vcpus=2) != base
    assert measurement(base_image, ovmf, vcpus=4) != measurement(base_image, ovmf, vcpus=2)
    # the measured line is guest_cmdline's: the image's own, then the pins
    expected = snp_launch_digest(ovmf, base_image / "vmlinuz", base_image / "initrd.img",
                                 f"{CMDLINE} gcvm.broker_cert=X")  # fmt: skip
    assert measurement(base_image, ovmf, cmdline_extra=" gcvm.broker_cert=X ") == expected.hex()


def test_boot_files_are_checked_against_the_builds_record(tmp_path: Path, ovmf: Path) -> None:
    image = fake_image(tmp_path / "image")
    (image / "initrd.img").write_bytes(b"swapped")
    with pytest.raises(UsageError, match="changed since it was built") as info:
        reference_policy(image, ovmf, vcpus=1)
    assert "gcvm image build --force" in (info.value.hint or "")
    unrecorded = fake_image(tmp_path / "old", record=False)
    with pytest.raises(UsageError, match="records no SHA-256 of vmlinuz"):
        reference_policy(unrecorded, ovmf, vcpus=1)
    (unrecorded / "vmlinuz").unlink()
    with pytest.raises(UsageError, match="lacks vmlinuz"):
        reference_policy(unrecorded, ovmf, vcpus=1)
    with pytest.raises(UsageError, match="holds no built image"):
        reference_policy(tmp_path, ovmf, vcpus=1)


def test_the_policy_pins_every_claim_it_can(tmp_path: Path, ovmf: Path) -> None:
    floor = parse_min_tcb("bootloader=3,tee=0,snp=8,microcode=115")
    ref = reference_policy(fake_image(tmp_path / "image"), ovmf, vcpus=2, min_tcb=floor)
    section = ref.policy["snp"]
    assert section["vmpl"] == [0] and section["allow_debug"] is False
    assert section["guest_policy"] == {"smt": True, "migrate_ma": False, "single_socket": False,
                                       "abi_min": "0.0"}  # fmt: skip
    assert section["min_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert unpinned(parse_policy(ref.policy, tmp_path)) == []
    with pytest.raises(UsageError, match="migration agent"):
        reference_policy(tmp_path / "image", ovmf, vcpus=1, snp_policy=0x70000)
    with pytest.raises(UsageError, match="debugging"):
        reference_policy(tmp_path / "image", ovmf, vcpus=1, snp_policy=0xB0000)
    with pytest.raises(UsageError, match="NAME=NUMBER"):
        parse_min_tcb("bootloader=3,fw=2")


def gcvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=120
    )


def err(done: subprocess.CompletedProcess[str]) -> str:
    """stderr as one line (the console wraps at its width)."""
    return " ".join(done.stderr.split())


def test_policy_command_writes_a_policy_the_broker_loads(tmp_path: Path, ovmf: Path) -> None:
    image = fake_image(tmp_path / "image")
    out = tmp_path / "policy.yaml"
    done = gcvm("attest", "policy", "--image", str(image), "--firmware", str(ovmf), "--vcpus",
                "4", "--cmdline-extra", "gcvm.owner_key=AAAA", "--min-tcb",
                "bootloader=3,tee=0,snp=8,microcode=115", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # a TEE master is locked: its command line ends with its code disk's root hash, the same
    # reproducible build `gcvm up` attaches
    locked = codedisk.build(tmp_path / "code.img", Path(__file__).resolve().parents[2]).cmdline()
    assert locked.startswith("gcvm.locked=1 gcvm.code=")
    expected = snp_launch_digest(ovmf, image / "vmlinuz", image / "initrd.img",
                                 f"{CMDLINE} gcvm.owner_key=AAAA {locked}", vcpus=4)  # fmt: skip
    assert done.stdout.strip() == expected.hex()
    assert "measure the SEV-SNP launch" in err(done)  # the progress line
    policy = load_policy(out)
    assert policy.snp is not None and policy.snp.measurements == [expected.hex()]
    assert f"cmdline: {CMDLINE} gcvm.owner_key=AAAA {locked}" in out.read_text()
    # another checkout's code is another measurement
    other = tmp_path / "other"
    shutil.copytree(Path(__file__).resolve().parents[2] / "groupcover", other / "groupcover",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (other / "groupcover" / "agent" / "jobs.py").write_text(
        (other / "groupcover" / "agent" / "jobs.py").read_text() + "\n# changed\n"
    )
    changed = gcvm("attest", "policy", "--image", str(image), "--firmware", str(ovmf), "--vcpus",
                   "4", "--code", str(other), "--out", str(tmp_path / "o.yaml"))  # fmt: skip
    assert changed.returncode == 0 and changed.stdout.strip() != expected.hex()
    missing = gcvm("attest", "policy", "--image", str(tmp_path), "--firmware", str(ovmf),
                   "--vcpus", "1", "--out", str(tmp_path / "p.yaml"))  # fmt: skip
    assert missing.returncode == 2 and "holds no built image" in err(missing)
    plain = gcvm("attest", "policy", "--image", str(image), "--firmware",
                 str(VECTORS / "ovmf_OvmfX64_suffix.bin"), "--vcpus", "1", "--out",
                 str(tmp_path / "p.yaml"))  # fmt: skip
    assert plain.returncode == 2 and "ovmf-amdsev" in err(plain)


def test_tdx_policy_pins_attributes_and_says_what_to_pin_by_hand(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "image")
    fw = tmp_path / "OVMF.inteltdx.ms.fd"
    fw.write_bytes(b"tdvf")
    ref = reference_policy(image, fw, tee="tdx", vcpus=1)
    assert ref.policy["tdx"]["td_attributes"] == "0x10000000"
    assert ref.policy["tdx"]["mrtd"] == []
    assert "launch the TD once on a host you trust" in ref.notes[0]
    out = tmp_path / "tdx.yaml"
    done = gcvm("attest", "policy", "--tee", "tdx", "--image", str(image), "--firmware",
                str(fw), "--vcpus", "1", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pin its mr_td" in err(done)
    assert load_policy(out).tdx.td_attributes == 0x10000000  # type: ignore[union-attr]


# --- one pinned claim against the real vectors ---------------------------------------------------

TRUSTEE_MEASUREMENT = (
    "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
    "23500644e0e692e6be917f9050d3d38c"
)
TDX_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)


def snp_matching() -> dict[str, Any]:
    """Pins made to match trustee-report-milan-v2.bin (policy 0x3001f, VMPL 0, its TCB)."""
    return {
        "measurements": [TRUSTEE_MEASUREMENT],
        "vmpl": [0],
        "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        "guest_policy": {"smt": True, "migrate_ma": False, "single_socket": False,
                         "abi_min": "0.31"},
        "allow_debug": False,
    }  # fmt: skip


def snp_verdict(section: dict[str, Any]) -> Any:
    certs = snp.SnpCerts()
    for name in ("trustee-vcek-milan.der", "amd-milan-ask-ark-asvk.pem"):
        for cert in snp.load_certificates((SNP / name).read_bytes(), name):
            certs.add(cert)
    verdict = snp.verify_report((SNP / "trustee-report-milan-v2.bin").read_bytes(), certs,
                                now=VCEK_NOW)  # fmt: skip
    assert verdict.valid, verdict.reason
    snp.check_policy(verdict, parse_policy({"snp": section}, SNP).snp)
    return verdict


def test_a_policy_made_to_match_the_snp_vector_accepts_it() -> None:
    assert snp_verdict(snp_matching()).valid
    assert unpinned(parse_policy({"snp": snp_matching()}, SNP)) == []


FLIPPED = "b" + TRUSTEE_MEASUREMENT[1:]
SNP_ONE_CLAIM = [
    ("measurements", [FLIPPED], "unknown measurement"),
    ("vmpl", [1], "VMPL 0 is not accepted"),
    ("min_tcb", {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 116}, "microcode 115 < 116"),
    ("min_tcb", {"bootloader": 4, "tee": 0, "snp": 8, "microcode": 115}, "bootloader 3 < 4"),
    ("guest_policy", {"smt": False}, "SMT is allowed"),
    ("guest_policy", {"single_socket": True}, "single socket is not allowed"),
    ("guest_policy", {"abi_min": "0.32"}, "ABI minimum 0.31 is below"),
    ("guest_policy", {"abi_min": "1.0"}, "ABI minimum 0.31 is below"),
]


@pytest.mark.parametrize(("key", "value", "reason"), SNP_ONE_CLAIM)
def test_a_policy_differing_in_one_snp_claim_refuses_the_vector(key, value, reason) -> None:
    section = snp_matching()
    section[key] = {**section[key], **value} if key == "guest_policy" else value
    verdict = snp_verdict(section)
    assert not verdict.valid
    assert reason in verdict.reason


def test_debug_cannot_be_allowed() -> None:
    with pytest.raises(UsageError, match="allow_debug must be false"):
        parse_policy({"snp": {**snp_matching(), "allow_debug": True}}, SNP)
    with pytest.raises(UsageError, match="DEBUG"):
        parse_policy({"tdx": {"td_attributes": "0x10000001"}}, TDX)


def tdx_verdict(section: dict[str, Any]) -> Any:
    verdict = tdx.verify_quote(
        (TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes(),
        tdx.read_collateral(TDX / "dcapqvl-tdx-quote-v4.collateral.json"),
        now=TDX_NOW,
    )
    assert verdict.valid, verdict.reason
    tdx.check_policy(verdict, parse_policy({"tdx": section}, TDX).tdx)
    return verdict


@pytest.mark.parametrize(
    ("section", "reason"),
    [
        ({"mrtd": [TDX_MRTD], "td_attributes": "0x10000000"}, None),
        ({"mrtd": ["0" + TDX_MRTD[1:]], "td_attributes": "0x10000000"}, "unknown MRTD"),
        ({"mrtd": [TDX_MRTD], "td_attributes": "0x0"}, "TD attributes 0x10000000 differ"),
        ({"mrtd": [TDX_MRTD], "td_attributes": 0x50000000}, "TD attributes 0x10000000 differ"),
    ],
)
def test_tdx_pins_against_the_vector(section: dict[str, Any], reason: str | None) -> None:
    verdict = tdx_verdict(section)
    assert verdict.valid is (reason is None)
    if reason:
        assert reason in verdict.reason


def test_verify_names_the_unpinned_claims_and_applies_the_pins(tmp_path: Path) -> None:
    loose = tmp_path / "loose.yaml"
    loose.write_text(yaml.safe_dump({"snp": {"measurements": [TRUSTEE_MEASUREMENT]},
                                     "tdx": {"mrtd": [TDX_MRTD]}}))  # fmt: skip
    report = str(SNP / "trustee-report-milan-v2.bin")
    done = gcvm("attest", "verify", "--policy", str(loose), report, "--certs", str(SNP))
    assert done.returncode == 0, done.stderr
    for item in ("snp tcb floor", "snp smt policy bit", "snp migration agent policy bit",
                 "snp abi minimum", "tdx td attributes", "tdx rtmrs"):  # fmt: skip
        assert f"unpinned: {item}" in err(done)
    assert "unpinned: snp measurement" not in err(done)
    tight = tmp_path / "tight.yaml"
    tight.write_text(yaml.safe_dump({"snp": snp_matching()}))
    done = gcvm("attest", "verify", "--policy", str(tight), report, "--certs", str(SNP))
    assert done.returncode == 0 and "unpinned" not in err(done), done.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"snp": {**snp_matching(), "vmpl": [1]}}))
    vlek = str(SNP / "trustee-report-milan-v3-vlek.bin")  # VMPL 1, but another measurement
    done = gcvm("attest", "verify", "--policy", str(wrong), report, vlek, "--certs", str(SNP),
                "--now", str(int(dt.datetime(2025, 6, 1, tzinfo=dt.UTC).timestamp())))  # fmt: skip
    assert done.returncode == 1
    assert "2 of 2 refused" in err(done) and "VMPL 0 is not accepted" in err(done)
    alone = gcvm("attest", "verify", "--policy", str(loose))
    assert alone.returncode == 0 and "unpinned: snp tcb floor" in err(alone)


def test_a_pods_initdata_digest_pins_host_data_and_mr_config_id() -> None:
    """A pod's initdata digest is in its evidence (SNP HOST_DATA, TDX MRCONFIGID): a policy pins
    it, and evidence carrying another digest is refused."""
    host_data = snp_verdict(snp_matching()).claims["host_data"]
    assert snp_verdict({**snp_matching(), "host_data": [host_data]}).valid
    other = ("f" if host_data[0] != "f" else "e") + host_data[1:]
    verdict = snp_verdict({**snp_matching(), "host_data": [other]})
    assert not verdict.valid and "HOST_DATA" in verdict.reason
    config_id = tdx_verdict({"mrtd": [TDX_MRTD]}).claims["mr_config_id"]
    assert tdx_verdict({"mrtd": [TDX_MRTD], "mr_config_id": [config_id]}).valid
    other = ("f" if config_id[0] != "f" else "e") + config_id[1:]
    verdict = tdx_verdict({"mrtd": [TDX_MRTD], "mr_config_id": [other]})
    assert not verdict.valid and "MRCONFIGID" in verdict.reason
    with pytest.raises(UsageError, match="32"):
        parse_policy({"snp": {**snp_matching(), "host_data": ["00" * 48]}}, SNP)
