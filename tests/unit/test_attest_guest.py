"""The guest side (groupcover.keyrelease) against fakes of its narrow interfaces: configfs-tsm
(an in-memory filesystem), /dev/sev-guest (a fake ioctl writing the firmware's response), the JWE
it unwraps (from the broker's jwcrypto and in Trustee's layout), and the seams."""

from __future__ import annotations

import ast
import base64
import ctypes
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from groupcover.keyrelease import evidence as ev
from groupcover.keyrelease.jwe import EphemeralKey, JweError, b64url
from groupcover.keyrelease.kbs import canonical_json as guest_canonical
from groupcover.keyrelease.kbs import report_data_for
from orchestrator.attest.common import canonical_json, expected_report_data
from orchestrator.attest.kbs import _jwe
from tests.unit.attest_testchain import FakeTsm, SnpTestChain

ROOT = Path(__file__).resolve().parents[2]


def test_cert_table_round_trip() -> None:
    table = ev.build_cert_table([("vcek", b"V" * 5), ("ask", b"A" * 7), ("ark", b"R" * 3)])
    parsed = ev.parse_cert_table(table)
    assert [e["cert_type"] for e in parsed] == ["vcek", "ask", "ark"]
    assert base64.b64decode(parsed[1]["data"]) == b"A" * 7
    with pytest.raises(ev.EvidenceError, match="truncated"):
        ev.parse_cert_table(table[:-2])


def test_configfs_tsm_snp_report_with_cert_table(tmp_path: Path) -> None:
    chain = SnpTestChain.make()
    fake = FakeTsm(tmp_path, "sev_guest", lambda inblob: chain.report(inblob), chain.cert_table())
    source = ev.ConfigfsTsm(root=tmp_path, fs=fake)
    evidence = source.collect(b"\x42" * 64)
    report = base64.b64decode(evidence["attestation_report"])
    assert len(report) == 1184 and report[0x50:0x90] == b"\x42" * 64
    assert [c["cert_type"] for c in evidence["cert_chain"]] == ["vcek", "ask", "ark"]
    assert source.tee == "snp" and not fake.entries and len(fake.removed) == 1


def test_configfs_tsm_tdx_quote(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "tdx_guest", lambda inblob: b"QUOTE" + inblob)
    source = ev.ConfigfsTsm(root=tmp_path, fs=fake)
    evidence = source.collect(bytes(64))
    assert base64.b64decode(evidence["quote"]) == b"QUOTE" + bytes(64)
    assert source.tee == "tdx"


def test_configfs_tsm_detects_a_racing_writer(tmp_path: Path) -> None:
    class Racy(FakeTsm):
        def read(self, path: Path) -> bytes:
            if path.name == "outblob":
                self.write(path.parent / "inblob", bytes(64))  # someone else wrote meanwhile
            return super().read(path)

    source = ev.ConfigfsTsm(root=tmp_path, fs=Racy(tmp_path, "tdx_guest", lambda b: b))
    with pytest.raises(ev.EvidenceError, match="raced"):
        source.collect(bytes(64))


def test_configfs_tsm_refuses_wrong_sizes_and_providers(tmp_path: Path) -> None:
    source = ev.ConfigfsTsm(root=tmp_path, fs=FakeTsm(tmp_path, "arm_cca", lambda b: b))
    with pytest.raises(ev.EvidenceError, match="64 bytes"):
        source.collect(b"short")
    with pytest.raises(ev.EvidenceError, match="neither TDX nor SEV-SNP"):
        source.collect(bytes(64))


def test_sev_guest_ioctl(tmp_path: Path) -> None:
    chain = SnpTestChain.make()
    calls = []

    def ioctl(fd: int, request: int, arg: bytearray) -> int:
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", arg)
        user_data = ctypes.string_at(req_addr, 64)
        vmpl = struct.unpack("<I", ctypes.string_at(req_addr + 64, 4))[0]
        calls.append((request, version, vmpl))
        body = struct.pack("<II", 0, 1184) + bytes(24) + chain.report(user_data)
        ctypes.memmove(resp_addr, body, len(body))
        return 0

    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    source = ev.SevGuestDevice(device, ioctl=ioctl)
    evidence = source.collect(b"\x07" * 64)
    report = base64.b64decode(evidence["attestation_report"])
    assert report[0x50:0x90] == b"\x07" * 64
    assert calls == [(0xC0205300, 1, 0)]

    def failing(fd: int, request: int, arg: bytearray) -> int:
        struct.pack_into("<II", arg, 24, 0x16, 0)
        raise OSError(5, "Input/output error")

    with pytest.raises(ev.EvidenceError, match="SNP_GET_REPORT failed: Input/output error"):
        ev.SevGuestDevice(device, ioctl=failing).collect(bytes(64))


def test_detect(monkeypatch, tmp_path: Path) -> None:
    assert isinstance(ev.detect("none"), ev.NoEvidence)
    monkeypatch.setattr(ev, "TSM_ROOT", tmp_path / "absent")
    monkeypatch.setattr(ev, "SEV_GUEST", tmp_path / "absent-dev")
    with pytest.raises(ev.EvidenceError, match="no tdx evidence"):
        ev.detect("tdx")
    (tmp_path / "dev").write_bytes(b"")
    monkeypatch.setattr(ev, "SEV_GUEST", tmp_path / "dev")
    assert isinstance(ev.detect("snp"), ev.SevGuestDevice)
    monkeypatch.setattr(ev, "TSM_ROOT", tmp_path)
    assert isinstance(ev.detect("snp"), ev.ConfigfsTsm)


def test_guest_and_broker_bind_the_same_report_data() -> None:
    key = EphemeralKey().public_jwk
    value = {"nonce": "abc", "tee-pubkey": key, "ü": [1, True, None]}
    assert guest_canonical(value) == canonical_json(value)
    assert report_data_for("abc", key) == expected_report_data("abc", key)


def test_jwe_from_the_broker_unwraps_only_with_the_ephemeral_key() -> None:
    key = EphemeralKey()
    response = _jwe(b"model key bytes", key.public_jwk)
    assert set(response) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    header = json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))
    assert header["alg"] == "ECDH-ES+A256KW" and header["enc"] == "A256GCM" and "epk" in header
    assert key.decrypt(response) == b"model key bytes"
    tampered = dict(response, ciphertext=b64url(b"x" * 15))
    with pytest.raises(JweError, match="modified"):
        key.decrypt(tampered)
    with pytest.raises(JweError, match="not wrapped to this guest's key"):
        EphemeralKey().decrypt(response)


def test_jwe_in_trustees_layout() -> None:
    """Trustee's KBS puts epk in the protected header, no apu/apv, aad absent."""
    key = EphemeralKey()
    jwk = key.public_jwk
    recipient = ec.EllipticCurvePublicNumbers(
        int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="), "big"),
        int.from_bytes(base64.urlsafe_b64decode(jwk["y"] + "=="), "big"),
        ec.SECP256R1(),
    ).public_key()
    eph = ec.generate_private_key(ec.SECP256R1())
    z = eph.exchange(ec.ECDH(), recipient)
    alg = b"ECDH-ES+A256KW"
    other = struct.pack(">I", len(alg)) + alg + bytes(8) + struct.pack(">I", 256)
    kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(z)
    cek = AESGCM.generate_key(256)
    numbers = eph.public_key().public_numbers()
    header = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "epk": {"crv": "P-256", "kty": "EC", "x": b64url(numbers.x.to_bytes(32, "big")),
                "y": b64url(numbers.y.to_bytes(32, "big"))},
    }  # fmt: skip
    protected = b64url(json.dumps(header).encode())
    iv = b"\1" * 12
    sealed = AESGCM(cek).encrypt(iv, b"secret", protected.encode())
    response = {
        "protected": protected,
        "encrypted_key": b64url(aes_key_wrap(kek, cek)),
        "iv": b64url(iv),
        "ciphertext": b64url(sealed[:-16]),
        "tag": b64url(sealed[-16:]),
    }
    assert key.decrypt(response) == b"secret"


def _imports(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_seams() -> None:
    import sys

    assert "groupcover" not in _imports(ROOT / "orchestrator" / "attest")
    guest = _imports(ROOT / "groupcover" / "keyrelease")
    assert "orchestrator" not in guest
    # the guest side needs only the stdlib and `cryptography` (added to the guest image)
    assert guest - set(sys.stdlib_module_names) - {"__future__"} <= {"cryptography", "groupcover"}
