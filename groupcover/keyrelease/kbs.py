"""A KBS (RCAR) client in the guest: auth -> attest -> resource -> JWE unwrap.

    client = KbsClient("http://10.0.0.1:8080", detect("snp"))
    release = client.get_resource("gcvm/model/key")
    release.secret, release.attested, release.label

The report data bound into the evidence is SHA-384 of the canonical JSON of
{"nonce", "tee-pubkey"}, zero-padded to 64 bytes (the KBS protocol's runtime-data binding), so a
replayed report is useless without the ephemeral private key, which never leaves this process.
Refusals come back as `KeyReleaseRefused` carrying the broker's reason.

The broker is authenticated only with a pin (`broker_cert`, the DER certificate the measured boot
names, `groupcover.trust`): then the URL must be https, the TLS channel trusts that certificate
and nothing else, and the attestation token must be signed by its key (`keyrelease.token`). Only
such a release can say `attested`. Without a pin the client still talks (plain HTTP, or TLS it
cannot check), but whoever answers may be the host: the release is labelled as coming from an
unauthenticated broker and is never `attested`.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Any

from groupcover.errors import GroupCoverError
from groupcover.keyrelease.evidence import EvidenceSource
from groupcover.keyrelease.jwe import EphemeralKey, b64url_decode
from groupcover.keyrelease.token import TokenRefused, verify_token

PROTOCOL_VERSION = "0.1.1"  # the shape this project's broker documents (runtime-data binding)
# 0.4.0: Trustee's current KBS (composite evidence: {"primary_evidence", "additional_evidence"})
PROTOCOLS = ("0.1.1", "0.4.0")
INSECURE_LABEL = "model key released without attestation"
UNAUTHENTICATED_LABEL = "model key released by an unauthenticated broker (no pinned identity)"


class KeyReleaseError(GroupCoverError):
    """The broker could not be reached, or answered something that is not the KBS protocol."""

    exit_code = 3


class KeyReleaseRefused(GroupCoverError):
    """The broker refused: the message is its reason (bad evidence, policy, nonce, ...)."""


class BrokerNotAuthenticated(KeyReleaseRefused):
    """The broker's answers cannot be trusted: it is not the pinned broker (its certificate, or
    its token's signature), or the channel cannot authenticate it (http with a pin)."""

    exit_code = 3


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
    attested: bool  # the pinned broker's verified token says the evidence verified
    tee: str
    claims: dict[str, Any]  # the token's (verified only where `authenticated`)
    seconds: float  # auth + evidence + attest + resource, wall time
    authenticated: bool = False  # the broker was the pinned one (TLS and token)

    @property
    def label(self) -> str:
        if self.attested:
            return f"model key released after {self.tee} attestation"
        if self.claims.get("attestation") == "verified":  # a claim nobody can vouch for
            return UNAUTHENTICATED_LABEL
        return INSECURE_LABEL


class KbsClient:
    def __init__(
        self,
        url: str,
        evidence: EvidenceSource,
        broker_cert: bytes | None = None,
        timeout: float = 30.0,
        protocol: str = PROTOCOL_VERSION,
        clock: Callable[[], float] = time.time,  # what a token's `exp` is checked against
    ) -> None:
        if protocol not in PROTOCOLS:
            raise KeyReleaseError(f"KBS protocol {protocol!r} is not one of {PROTOCOLS}")
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.evidence = evidence
        self.timeout = timeout
        self.broker_cert = broker_cert
        self.clock = clock
        self.token: str | None = None  # the attestation token of the last attest()
        scheme = self.url.partition("://")[0].lower()
        if broker_cert is not None and scheme != "https":
            raise BrokerNotAuthenticated(
                f"the broker is pinned; {scheme}:// cannot authenticate it ({self.url})",
                hint="give the broker's https:// URL (`gcvm broker serve --identity DIR`)",
            )
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(CookieJar()),
            urllib.request.ProxyHandler({}),  # the broker is on the cluster's network: no proxy
            urllib.request.HTTPSHandler(context=_tls_context(broker_cert)),
        )

    @property
    def pin_sha256(self) -> str | None:
        return hashlib.sha256(self.broker_cert).hexdigest() if self.broker_cert else None

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
            if isinstance(reason, ssl.SSLCertVerificationError) and self.broker_cert:
                raise BrokerNotAuthenticated(
                    f"the broker at {self.url} did not present the pinned certificate "
                    f"(sha256 {self.pin_sha256}): {reason.verify_message}",
                    hint="whoever answers there is not the owner's broker; the host may be "
                    "impersonating it",
                ) from None
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
        """auth + attest: the ephemeral key and the token's claims, verified against the pinned
        broker (unverified, informative only, without a pin)."""
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
        if self.broker_cert is None:
            return key, _jwt_claims(token)
        try:
            return key, verify_token(token, self.broker_cert, pubkey, self.clock())
        except TokenRefused as exc:
            raise BrokerNotAuthenticated(f"{exc.message} (broker {self.url})") from None

    def get_resource(self, name: str) -> Release:
        start = time.monotonic()
        key, claims = self.attest()
        response = self._call("GET", f"/kbs/v0/resource/{name}")
        secret = key.decrypt(response)
        authenticated = self.broker_cert is not None
        return Release(
            secret=secret,
            attested=authenticated and claims.get("attestation") == "verified",
            tee=str(claims.get("tee", self.evidence.tee)),
            claims=claims,
            seconds=time.monotonic() - start,
            authenticated=authenticated,
        )


def _tls_context(broker_cert: bytes | None) -> ssl.SSLContext:
    if broker_cert is None:
        # nothing to check a certificate against: TLS without a pin authenticates no one, and
        # the release says so (never `attested`); it still hides the traffic from onlookers
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        # the trust store holds exactly the pinned certificate, self-signed: a peer passes only
        # by proving it holds that certificate's key. The host name adds nothing to that (the
        # broker is reached by whatever address the cluster's network gives it), so it is not
        # checked: the broker's identity is its key.
        context = ssl.create_default_context(cadata=broker_cert)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


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
