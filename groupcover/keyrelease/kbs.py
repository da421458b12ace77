"""A KBS (RCAR) client in the guest: auth -> attest -> resource -> JWE unwrap.

    client = KbsClient("http://10.0.0.1:8080", detect("snp"))
    release = client.get_resource("gcvm/model/key")
    release.secret, release.attested, release.label

The report data bound into the evidence is SHA-384 of the canonical JSON of
{"nonce", "tee-pubkey"}, zero-padded to 64 bytes (the KBS protocol's runtime-data binding), so a
replayed report is useless without the ephemeral private key, which never leaves this process.
Refusals come back as `KeyReleaseRefused` carrying the broker's reason.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Any

from groupcover.errors import GroupCoverError
from groupcover.keyrelease.evidence import EvidenceSource
from groupcover.keyrelease.jwe import EphemeralKey, b64url_decode

PROTOCOL_VERSION = "0.1.1"  # the shape this project's broker documents (runtime-data binding)
# 0.4.0: Trustee's current KBS (composite evidence: {"primary_evidence", "additional_evidence"})
PROTOCOLS = ("0.1.1", "0.4.0")
INSECURE_LABEL = "model key released without attestation"


class KeyReleaseError(GroupCoverError):
    """The broker could not be reached, or answered something that is not the KBS protocol."""

    exit_code = 3


class KeyReleaseRefused(GroupCoverError):
    """The broker refused: the message is its reason (bad evidence, policy, nonce, ...)."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 for strings, integers, bools, objects and arrays (what runtime data holds)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def report_data_for(
    nonce: str, tee_pubkey: dict[str, Any], additional_evidence: str | None = None
) -> bytes:
    """SHA-384 of the canonical JSON {"nonce", "tee-pubkey"}, zero-padded to 64 bytes; KBS
    protocol 0.4 (composite evidence) adds "additional-evidence" to the hashed object."""
    data: dict[str, Any] = {"nonce": nonce, "tee-pubkey": tee_pubkey}
    if additional_evidence is not None:
        data["additional-evidence"] = additional_evidence
    return hashlib.sha384(canonical_json(data)).digest().ljust(64, b"\0")


@dataclass
class Release:
    secret: bytes
    attested: bool
    tee: str
    claims: dict[str, Any]
    seconds: float  # auth + evidence + attest + resource, wall time

    @property
    def label(self) -> str:
        if not self.attested:
            return INSECURE_LABEL
        return f"model key released after {self.tee} attestation"


class KbsClient:
    def __init__(
        self,
        url: str,
        evidence: EvidenceSource,
        timeout: float = 30.0,
        protocol: str = PROTOCOL_VERSION,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise KeyReleaseError(f"KBS protocol {protocol!r} is not one of {PROTOCOLS}")
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.evidence = evidence
        self.timeout = timeout
        self.token: str | None = None  # the attestation token of the last attest()
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(CookieJar()),
            urllib.request.ProxyHandler({}),  # the broker is on the cluster's network: no proxy
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = _detail(exc.read())
            raise KeyReleaseRefused(
                f"broker refused {method} {path} ({exc.code}): {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KeyReleaseError(
                f"broker at {self.url} unreachable: {reason}",
                hint="is `gcvm broker serve` running and listening on the cluster's network?",
            ) from None
        try:
            value = json.loads(payload)
        except ValueError:
            raise KeyReleaseError(f"broker answered {path} with non-JSON") from None
        if not isinstance(value, dict):
            raise KeyReleaseError(f"broker answered {path} with a non-object")
        return value

    def attest(self) -> tuple[EphemeralKey, dict[str, Any]]:
        """auth + attest: the ephemeral key and the token's claims (unverified: informative)."""
        challenge = self._call(
            "POST",
            "/kbs/v0/auth",
            {"version": self.protocol, "tee": self.evidence.tee, "extra-params": ""},
        )
        nonce = challenge.get("nonce")
        if not isinstance(nonce, str):
            raise KeyReleaseError("broker's challenge has no nonce")
        key = EphemeralKey()
        pubkey = key.public_jwk
        if self.protocol == "0.4.0":
            primary = self.evidence.collect(report_data_for(nonce, pubkey, ""))
            evidence = {"primary_evidence": primary, "additional_evidence": ""}
        else:
            evidence = self.evidence.collect(report_data_for(nonce, pubkey))
        result = self._call(
            "POST",
            "/kbs/v0/attest",
            {"runtime-data": {"nonce": nonce, "tee-pubkey": pubkey}, "tee-evidence": evidence},
        )
        token = result.get("token")
        if not isinstance(token, str):
            raise KeyReleaseError("broker's attestation response has no token")
        self.token = token
        return key, _jwt_claims(token)

    def get_resource(self, name: str) -> Release:
        start = time.monotonic()
        key, claims = self.attest()
        response = self._call("GET", f"/kbs/v0/resource/{name}")
        secret = key.decrypt(response)
        return Release(
            secret=secret,
            attested=claims.get("attestation") == "verified",
            tee=str(claims.get("tee", self.evidence.tee)),
            claims=claims,
            seconds=time.monotonic() - start,
        )


def _detail(body: bytes) -> str:
    try:
        value = json.loads(body)
        return str(value.get("detail") or value)
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:300] or "(no reason given)"


def _jwt_claims(token: str) -> dict[str, Any]:
    try:
        claims = json.loads(b64url_decode(token.split(".")[1]))
    except (IndexError, ValueError):
        raise KeyReleaseError("broker's token is not a JWT") from None
    return claims if isinstance(claims, dict) else {}
