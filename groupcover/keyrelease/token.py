"""The broker's attestation token, verified against the pinned broker certificate, with
`cryptography` only (the guest image has no JOSE library).

A token is believed only if it is a compact JWS whose header says `alg: ES256` exactly (never
`none`, never an HMAC: the pinned key is public, so HS256 "signed" with it proves nothing), whose
64-byte r||s signature verifies with the pinned certificate's P-256 key, whose `exp` is still ahead
of this guest's clock, and whose `tee-pubkey` is the ephemeral key of this very attestation (a
token the broker issued to another guest, or for another attestation, says nothing about this
one). The clock is the guest's; in a confidential VM the host can skew it, so `exp` bounds a replay
only as well as that clock does: the binding to this attestation's ephemeral key is the check that
does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from groupcover.errors import GroupCoverError
from groupcover.keyrelease.jwe import b64url_decode

ALG = "ES256"


class TokenRefused(GroupCoverError):
    """The broker's token is not signed by the pinned broker, has expired, or is not this
    attestation's."""

    exit_code = 3


def _part(text: str, what: str) -> Any:
    try:
        return json.loads(b64url_decode(text))
    except ValueError:
        raise TokenRefused(f"the broker's token {what} is not base64url JSON") from None


def verify_token(
    token: str, broker_cert: bytes, tee_pubkey: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """The token's claims, once verified as above; else `TokenRefused` saying why."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRefused("the broker's token is not a compact JWS (three parts)")
    header = _part(parts[0], "header")
    if not isinstance(header, dict) or header.get("alg") != ALG:
        alg = header.get("alg") if isinstance(header, dict) else None
        raise TokenRefused(f"the broker's token is signed with alg {alg!r}, not {ALG}: refused")
    fingerprint = hashlib.sha256(broker_cert).hexdigest()
    if "kid" in header and header["kid"] != fingerprint:
        raise TokenRefused(f"the broker's token names signing key {str(header['kid'])[:64]!r}, "
                           f"not the pinned broker (sha256 {fingerprint})")  # fmt: skip
    try:
        signature = b64url_decode(parts[2])
    except ValueError:
        signature = b""
    if len(signature) != 64:
        raise TokenRefused(f"the broker's token has a {len(signature)}-byte signature, "
                           "not an ES256 one (64 bytes)")  # fmt: skip
    key = x509.load_der_x509_certificate(broker_cert).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TokenRefused("the pinned broker certificate's key is not EC P-256")
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TokenRefused(f"the broker's token is not signed by the pinned broker "
                           f"(sha256 {fingerprint})") from None  # fmt: skip
    claims = _part(parts[1], "claims")
    if not isinstance(claims, dict):
        raise TokenRefused("the broker's token claims are not an object")
    exp = claims.get("exp")
    now = time.time() if now is None else now
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or now >= exp:
        raise TokenRefused(f"the broker's token has expired (exp {exp!r}, now {int(now)})")
    if claims.get("tee-pubkey") != tee_pubkey:
        raise TokenRefused("the broker's token is not for this attestation (its tee-pubkey is "
                           "another key)")  # fmt: skip
    return claims
