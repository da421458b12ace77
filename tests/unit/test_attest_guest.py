"""The guest side (groupcover.keyrelease): the JWE it unwraps (from the broker's jwcrypto and in
Trustee's layout), the report data both sides bind, and the seams. The evidence sources have
their own tests (test_guest_evidence.py)."""

from __future__ import annotations

import ast
import base64
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from groupcover.keyrelease.jwe import EphemeralKey, JweError, b64url
from groupcover.keyrelease.kbs import canonical_json as guest_canonical
from groupcover.keyrelease.kbs import report_data_for
from orchestrator.attest.common import canonical_json, expected_report_data
from orchestrator.attest.kbs import _jwe

ROOT = Path(__file__).resolve().parents[2]


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
