"""What the broker's clients send, parsed before anything else looks at it: JSON bodies (an object,
nested at most `MAX_JSON_DEPTH` deep), base64 fields, the guest's `tee-pubkey` (a public JWK whose
EC point lies on its curve, or a valid RSA key), and the refusals the HTTP server turns into
Trustee's ErrorInformation."""

from __future__ import annotations

import base64
import binascii
import json
from http import HTTPStatus
from typing import Any

from orchestrator.attest.common import BadEvidence

ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors"
MAX_JSON_DEPTH = 32  # the protocol's objects are 4 deep
_CURVES = {"P-256": 32, "P-384": 48, "P-521": 66}  # coordinate sizes in bytes


class Refusal(Exception):
    """A request the broker refuses: HTTP status, ErrorInformation type, reason for the client."""

    def __init__(self, status: HTTPStatus, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"type": f"{ERROR_TYPE_PREFIX}/{self.kind}", "detail": self.detail}


def json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(HTTPStatus.UNAUTHORIZED, "InvalidRequest", f"{what} is not JSON") from None
    except RecursionError:
        value = None
    if value is None or _too_deep(value):
        raise Refusal(
            HTTPStatus.BAD_REQUEST, "InvalidRequest",
            f"{what} is nested more than {MAX_JSON_DEPTH} deep",
        )  # fmt: skip
    if not isinstance(value, dict):
        raise Refusal(HTTPStatus.UNAUTHORIZED, "InvalidRequest", f"{what} is not an object")
    return value


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise BadEvidence(f"{what} must be a base64 string")
    try:
        padded = text + "=" * (-len(text) % 4)
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise BadEvidence(f"{what} is not base64") from None


def tee_pubkey(value: Any) -> dict[str, Any]:
    """The guest's public JWK, checked to be one a JWE can be wrapped to."""
    from jwcrypto import jwk

    if not isinstance(value, dict):
        raise BadEvidence("runtime-data has no tee-pubkey JWK")
    if "d" in value or "p" in value:
        raise BadEvidence("tee-pubkey holds private key material")
    kty = value.get("kty")
    if kty == "EC" and value.get("crv") not in _CURVES:
        raise BadEvidence(f"tee-pubkey curve {value.get('crv')!r} is not P-256/384/521")
    if kty not in ("EC", "RSA"):
        raise BadEvidence(f"tee-pubkey kty {kty!r} is not EC or RSA")
    try:
        jwk.JWK(**{k: v for k, v in value.items() if k in ("kty", "crv", "x", "y", "n", "e")})
    except Exception as exc:  # jwcrypto raises several types for a bad key
        raise BadEvidence(f"tee-pubkey is not a valid JWK ({exc})") from None
    _check_key(value)
    return value


def _check_key(value: dict[str, Any]) -> None:
    """Decode the key with `cryptography`: an EC point off its curve (or an invalid RSA key) is a
    malformed request, refused now rather than failing when the key is wrapped to it."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def integer(name: str, size: int | None = None) -> int:
        try:
            raw = base64.urlsafe_b64decode(str(value.get(name, "")) + "==")
        except (binascii.Error, ValueError):
            raw = b""
        if not raw or (size is not None and len(raw) != size):
            raise Refusal(
                HTTPStatus.BAD_REQUEST, "InvalidRequest", f"tee-pubkey {name} is malformed"
            )
        return int.from_bytes(raw, "big")

    if value["kty"] == "EC":
        size = _CURVES[value["crv"]]
        curve: ec.EllipticCurve = {
            32: ec.SECP256R1(), 48: ec.SECP384R1(), 66: ec.SECP521R1()
        }[size]  # fmt: skip
        numbers = ec.EllipticCurvePublicNumbers(integer("x", size), integer("y", size), curve)
        try:
            numbers.public_key()
        except ValueError:
            raise Refusal(
                HTTPStatus.BAD_REQUEST, "InvalidRequest",
                f"tee-pubkey: its point is not on the curve {value['crv']}",
            ) from None  # fmt: skip
        return
    try:
        rsa.RSAPublicNumbers(integer("e"), integer("n")).public_key()
    except ValueError:
        raise Refusal(
            HTTPStatus.BAD_REQUEST, "InvalidRequest", "tee-pubkey: not a valid RSA key"
        ) from None
