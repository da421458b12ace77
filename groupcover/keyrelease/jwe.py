"""The guest's ephemeral key and the JWE it unwraps, on `cryptography` alone.

The key is EC P-256 with `alg` ECDH-ES+A256KW (what Trustee's KBS wraps to); a response is a
flattened JWE with `enc` A256GCM. ECDH-ES key agreement uses the Concat KDF of RFC 7518 4.6
(SHA-256, AlgorithmID = the `alg`, PartyUInfo/PartyVInfo from `apu`/`apv`); the content key is
unwrapped with AES key wrap (RFC 3394); the AEAD's associated data is ASCII(BASE64URL(protected))
(plus "." and the `aad` member when present). The private key never leaves the process.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from groupcover.errors import GroupCoverError

ALG = "ECDH-ES+A256KW"
CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}


class JweError(GroupCoverError):
    """The broker's response does not decrypt with this guest's ephemeral key."""


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class EphemeralKey:
    """An EC P-256 key pair made for one attestation; `public_jwk` goes into runtime-data."""

    def __init__(self) -> None:
        self._private = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_jwk(self) -> dict[str, str]:
        numbers = self._private.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "alg": ALG,
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }

    def decrypt(self, response: dict[str, Any]) -> bytes:
        try:
            return self._decrypt(response)
        except (KeyError, TypeError, ValueError) as exc:
            raise JweError(f"malformed JWE from the broker ({exc})") from None

    def _decrypt(self, response: dict[str, Any]) -> bytes:
        protected_b64 = response["protected"]
        header: dict[str, Any] = {}
        header.update(response.get("unprotected") or {})
        header.update(response.get("header") or {})
        header.update(json.loads(b64url_decode(protected_b64)))
        if header.get("alg") != ALG or header.get("enc") != "A256GCM":
            raise JweError(
                f"JWE alg/enc {header.get('alg')}/{header.get('enc')} is not {ALG}/A256GCM"
            )
        epk = header["epk"]
        if epk.get("kty") != "EC" or epk.get("crv") != "P-256":
            raise JweError("JWE epk is not an EC P-256 key")
        peer = ec.EllipticCurvePublicNumbers(
            int.from_bytes(b64url_decode(epk["x"]), "big"),
            int.from_bytes(b64url_decode(epk["y"]), "big"),
            ec.SECP256R1(),
        ).public_key()  # raises ValueError for a point off the curve
        shared = self._private.exchange(ec.ECDH(), peer)
        apu = b64url_decode(header["apu"]) if "apu" in header else b""
        apv = b64url_decode(header["apv"]) if "apv" in header else b""
        other = _lp(ALG.encode()) + _lp(apu) + _lp(apv) + struct.pack(">I", 256)
        kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(shared)
        try:
            cek = aes_key_unwrap(kek, b64url_decode(response["encrypted_key"]))
        except InvalidUnwrap:
            raise JweError("the JWE's content key is not wrapped to this guest's key") from None
        aad = protected_b64.encode()
        if response.get("aad"):
            aad += b"." + response["aad"].encode()
        try:
            return AESGCM(cek).decrypt(
                b64url_decode(response["iv"]),
                b64url_decode(response["ciphertext"]) + b64url_decode(response["tag"]),
                aad,
            )
        except InvalidTag:
            raise JweError("the JWE's ciphertext or header was modified") from None


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data
