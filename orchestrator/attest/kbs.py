"""The key broker's protocol core, speaking the Confidential Containers KBS protocol (RCAR), so
Trustee can replace it (HTTP: `orchestrator.attest.broker`).

    POST /kbs/v0/auth      {"version", "tee", "extra-params"}  -> Set-Cookie kbs-session-id,
                           {"nonce", "extra-params"}
    POST /kbs/v0/attest    {"runtime-data": {"nonce", "tee-pubkey"}, "tee-evidence": {...}}
                           -> {"token": <JWT>}   (cookie: the session of the nonce)
    GET  /kbs/v0/resource/<repository>/<type>/<tag>   (cookie or Authorization: Bearer <token>)
                           -> flattened JWE, content key wrapped to the tee-pubkey

The evidence's report data must be SHA-384 of the canonical JSON of {"nonce", "tee-pubkey"},
zero-padded to 64 bytes (Trustee >= 0.4 also hashes "additional-evidence" with them; both forms are
accepted). Nonces are single-use and expire after `nonce_ttl_s`; a challenge is held by the client
(a MAC'd token, `orchestrator.attest.challenge`), so the broker keeps state only for a guest whose
evidence verified. Errors are Trustee's
ErrorInformation JSON {"type", "detail"}: 401 for a refused request or attestation, 403 for a
resource the session may not have or whose file group or others may read or write (a repository
file found so at request time; such a policy resource stops the broker at start), 404 for an
unknown resource. Every decision is logged.

The token is an ES256 JWT signed with the broker identity's key (`kid`: its certificate's
SHA-256), the key a master pins; without an identity (a demo broker) with a key made per process,
which nothing can pin. A resource may name the measurements it is released to (the policy's
`resources` entry `{file, measurements}`, or a repository key's `.<tag>.measurements` beside it);
a session whose verified measurement (SNP MEASUREMENT, TDX MRTD) is not one of them gets a 403.

Evidence (`tee-evidence`, or its `primary_evidence`):
  snp: {"attestation_report": base64 of the 1184-byte report,
        "cert_chain": [{"cert_type": "vcek"|"vlek"|"ask"|"ark", "data": base64 DER}] (optional)}
  tdx: {"quote": base64 of the DCAP quote, "cc_eventlog": ... (ignored)}
  sample: {} (only with --insecure-no-attestation: the key is released without attestation)
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from orchestrator.attest import snp, tdx
from orchestrator.attest.challenge import Challenges
from orchestrator.attest.common import (
    BadEvidence,
    Verdict,
    canonical_json,
    expected_report_data,
)
from orchestrator.attest.identity import Identity
from orchestrator.attest.policy import Policy, parse_measurements
from orchestrator.attest.request import (
    Refusal,
    b64decode,
    json_object,
    tee_pubkey,
)
from orchestrator.errors import UsageError
from orchestrator.keys import ExposedSecret, check_private, exposed

log = logging.getLogger("gcvm.broker")

PROTOCOL_VERSIONS = ("0.1.0", "0.1.1", "0.2.0", "0.3.0", "0.4.0")
SESSION_COOKIE = "kbs-session-id"
INSECURE_LABEL = "model key released without attestation"
MAX_BODY = 4 << 20
MAX_SESSIONS = 4096  # attested sessions (and nonces consumed) within their lifetime
MAX_SEEN = 1 << 16  # digests of verified reports remembered to name replays
KNOWN_TEES = ("snp", "tdx", "sample")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one part of <repo>/<type>/<tag>


@dataclass
class Session:
    id: str  # the challenge token (the kbs-session-id cookie)
    tee: str
    nonce: str
    created: float  # when the nonce was issued
    attested_until: float | None = None
    tee_pubkey: dict[str, Any] | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    attested: bool = False  # False: released without attestation (insecure mode)
    peer: str = ""  # the client's address (from the HTTP connection)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Broker:
    """The protocol without HTTP: sessions, verification, policy, release. Thread-safe."""

    def __init__(
        self,
        policy: Policy,
        *,
        insecure_no_attestation: bool = False,
        clock: Callable[[], float] = time.time,
        tdx_verifier: tdx.QuoteVerifier = tdx.dcap_qvl_verifier,
        verify_time: int | None = None,
        repository: Path | None = None,
        on_decision: Callable[[dict[str, Any]], None] | None = None,
        identity: Identity | None = None,
    ) -> None:
        from jwcrypto import jwk

        self.policy = policy
        # resources not named in the policy: REPOSITORY/<repo>/<type>/<tag> files, looked up at
        # each request (Trustee's local file system repository), so that keys added later serve
        self.repository = repository
        self.on_decision = on_decision
        self.insecure = insecure_no_attestation
        self.clock = clock
        self.tdx_verifier = tdx_verifier
        self.verify_time = verify_time  # fixed "now" for certificates and collateral (tests)
        self._sessions: dict[str, Session] = {}  # attested sessions only
        self._challenges = Challenges(MAX_SESSIONS)
        # every decision (attest accepted/refused, resource released/refused), newest last
        self.decisions: deque[dict[str, Any]] = deque(maxlen=MAX_SESSIONS)
        self.policy_digest = _file_digest(policy.source)
        self._request = threading.local()  # .peer: the address of this thread's request
        self._seen: dict[str, float] = {}  # digest of verified evidence -> when first seen
        self._lock = threading.Lock()
        self.identity = identity
        self._token_key = (
            jwk.JWK.from_pem(identity.key_pem)
            if identity is not None
            else jwk.JWK.generate(kty="EC", crv="P-256")
        )
        self._token_kid = identity.fingerprint if identity is not None else None
        self._snp_certs = (
            snp.SnpCerts.load_dir(policy.snp.certs) if policy.snp and policy.snp.certs else None
        )
        self._snp_roots = None
        if policy.snp and policy.snp.roots:
            try:
                data = policy.snp.roots.read_bytes()
            except OSError as exc:
                raise UsageError(f"policy snp.roots {policy.snp.roots}: {exc.strerror}") from None
            self._snp_roots = snp.load_certificates(data, str(policy.snp.roots))
        self._collateral = (
            tdx.read_collateral(policy.tdx.collateral)
            if policy.tdx and policy.tdx.collateral
            else None
        )
        for name, path in policy.resources.items():
            if not path.is_file():
                raise UsageError(f"resource {name}: {path} is not a file")
            try:  # a key others may read is not released: refuse to start rather than serve it
                check_private(path)
            except ExposedSecret as exc:
                raise ExposedSecret(f"resource {name}: {exc.message}", hint=exc.hint) from None

    @property
    def token_public_key(self) -> dict[str, Any]:
        return json.loads(self._token_key.export_public())

    # --- /kbs/v0/auth ----------------------------------------------------------------------
    def auth(self, body: bytes, peer: str = "") -> tuple[Session, dict[str, Any]]:
        self._request.peer = peer
        request = json_object(body, "Request")
        version = request.get("version")
        tee = request.get("tee")
        if version not in PROTOCOL_VERSIONS:
            raise self._refuse(
                "auth", HTTPStatus.UNAUTHORIZED, "RcarAuthFailed",
                f"KBS protocol version {version!r} is not supported "
                f"({', '.join(PROTOCOL_VERSIONS)})",
            )  # fmt: skip
        if tee not in KNOWN_TEES:
            raise self._refuse(
                "auth", HTTPStatus.UNAUTHORIZED, "RcarAuthFailed",
                f"TEE {tee!r} is not supported ({', '.join(KNOWN_TEES)})",
            )  # fmt: skip
        if tee == "sample" and not self.insecure:
            raise self._refuse(
                "auth", HTTPStatus.UNAUTHORIZED, "RcarAuthFailed",
                "a guest without a TEE gets no key: the broker was not started with "
                "--insecure-no-attestation",
            )  # fmt: skip
        if tee in ("snp", "tdx") and getattr(self.policy, tee) is None:
            raise self._refuse(
                "auth", HTTPStatus.UNAUTHORIZED, "RcarAuthFailed",
                f"the broker's policy has no {tee} section: no {tee} guest is accepted",
            )  # fmt: skip
        challenge = self._challenges.issue(tee, self.clock())  # held by the client, not here
        session = Session(challenge.token, tee, challenge.nonce, challenge.issued, peer=peer)
        log.info("auth: session %s for a %s guest, nonce issued", session.id[:8], tee)
        return session, {"nonce": session.nonce, "extra-params": ""}

    def _purge(self, now: float) -> None:
        for sid in [s.id for s in self._sessions.values() if now > (s.attested_until or 0) + 60]:
            del self._sessions[sid]
        if len(self._seen) > MAX_SEEN:  # old reports cannot bind a new nonce anyway
            for digest in list(self._seen)[: MAX_SEEN // 2]:
                del self._seen[digest]

    # --- /kbs/v0/attest --------------------------------------------------------------------
    def attest(
        self, session_id: str | None, body: bytes, peer: str = ""
    ) -> tuple[Session, dict[str, Any]]:
        self._request.peer = peer
        now = self.clock()
        challenge = self._challenges.open(session_id)
        if challenge is None:
            raise self._refuse(
                "attest", HTTPStatus.UNAUTHORIZED, "RcarAttestFailed",
                "no such session: POST /kbs/v0/auth first (cookie kbs-session-id)",
            )  # fmt: skip
        session = Session(challenge.token, challenge.tee, challenge.nonce, challenge.issued,
                          peer=peer)  # fmt: skip
        if self._challenges.consumed(challenge.nonce):
            raise self._refuse(
                "attest", HTTPStatus.UNAUTHORIZED, "RcarAttestFailed",
                "nonce already used: each challenge takes one attestation, ask for a new one",
                session,
            )  # fmt: skip
        if not now - session.created <= self.policy.nonce_ttl_s:
            raise self._refuse(
                "attest", HTTPStatus.UNAUTHORIZED, "RcarAttestFailed",
                f"nonce expired ({now - session.created:.0f} s old, lifetime "
                f"{self.policy.nonce_ttl_s:.0f} s)",
                session,
            )  # fmt: skip
        try:
            attestation = json_object(body, "Attestation")
            runtime = attestation.get("runtime-data")
            if not isinstance(runtime, dict):
                raise BadEvidence("Attestation has no runtime-data object")
            if runtime.get("nonce") != session.nonce:
                raise Refusal(
                    HTTPStatus.UNAUTHORIZED, "RcarAttestFailed",
                    "the nonce in runtime-data is not this session's nonce",
                )  # fmt: skip
            pubkey = tee_pubkey(runtime.get("tee-pubkey"))
            if session.tee == "sample":
                claims: dict[str, Any] = {"attestation": "none", "warning": INSECURE_LABEL}
                attested = False
            else:
                claims = self._verify(session, runtime, pubkey, attestation.get("tee-evidence"))
                attested = True
        except BadEvidence as exc:
            raise self._refuse(
                "attest", HTTPStatus.UNAUTHORIZED, "RcarAttestFailed", exc.message, session
            ) from None
        except Refusal as exc:
            raise self._refuse("attest", exc.status, exc.kind, exc.detail, session) from None
        # state only now that the evidence verified: the nonce consumed, the attested session
        used = self._challenges.consume(challenge, session.created + self.policy.nonce_ttl_s, now)
        if used is not None:
            status = HTTPStatus.SERVICE_UNAVAILABLE
            if "already" in used:
                status = HTTPStatus.UNAUTHORIZED
            raise self._refuse("attest", status, "RcarAttestFailed", used, session)
        session.tee_pubkey = pubkey
        session.claims = claims
        session.attested = attested
        session.attested_until = now + self.policy.token_ttl_s
        with self._lock:
            self._purge(now)
            if len(self._sessions) >= MAX_SESSIONS:
                raise self._refuse(
                    "attest", HTTPStatus.SERVICE_UNAVAILABLE, "RcarAttestFailed",
                    "too many attested sessions: try again later", session,
                )  # fmt: skip
            self._sessions[session.id] = session
        token = self._token(session, now)
        self._decide("attest", "accepted", session, attested=attested, evaluation=claims)
        if attested:
            log.info(
                "attest ACCEPTED: session %s, %s, %s",
                session.id[:8], session.tee, _summary(session.tee, claims),
            )  # fmt: skip
        else:
            log.warning("attest ACCEPTED without evidence: session %s (%s)", session.id[:8],
                        INSECURE_LABEL)  # fmt: skip
        return session, {"token": token}

    def _verify(
        self, session: Session, runtime: dict[str, Any], pubkey: dict[str, Any], evidence: Any
    ) -> dict[str, Any]:
        if not isinstance(evidence, dict):
            raise BadEvidence("Attestation has no tee-evidence object")
        additional = None
        if "primary_evidence" in evidence:  # KBS protocol >= 0.4: composite evidence
            additional = evidence.get("additional_evidence", "")
            if additional not in ("", "{}", None):
                raise BadEvidence("additional_evidence is not supported by this broker")
            evidence = evidence["primary_evidence"]
            if not isinstance(evidence, dict):
                raise BadEvidence("primary_evidence is not an object")
        if session.tee == "snp":
            raw = b64decode(evidence.get("attestation_report"), "attestation_report")
            self._replay_check(raw)
            verdict = self._verify_snp(raw, evidence.get("cert_chain"))
        else:
            raw = b64decode(evidence.get("quote"), "quote")
            self._replay_check(raw)
            verdict = self._verify_tdx(raw)
        if verdict.verified:  # its signature holds: a second presentation is a replay
            with self._lock:
                self._seen.setdefault(hashlib.sha256(raw).hexdigest(), self.clock())
        if not verdict.verified:
            raise Refusal(HTTPStatus.UNAUTHORIZED, "RcarAttestFailed", verdict.reason)
        got = bytes.fromhex(verdict.claims["report_data"])
        bindings = [expected_report_data(session.nonce, pubkey)]
        if additional is not None:
            data = {"nonce": session.nonce, "tee-pubkey": pubkey, "additional-evidence": additional}
            bindings.append(hashlib.sha384(canonical_json(data)).digest().ljust(64, b"\0"))
        if got not in bindings:
            verdict.fail(
                "report data does not bind this session's nonce and tee-pubkey "
                "(SHA-384 of the canonical JSON {nonce, tee-pubkey})"
            )
        if not verdict.valid:
            raise Refusal(HTTPStatus.UNAUTHORIZED, "RcarAttestFailed", verdict.reason)
        return {"tee": session.tee, **verdict.claims, "verified": verdict.verified}

    def _replay_check(self, raw: bytes) -> None:
        with self._lock:
            first = self._seen.get(hashlib.sha256(raw).hexdigest())
        if first is not None:
            raise Refusal(
                HTTPStatus.UNAUTHORIZED, "RcarAttestFailed",
                f"replayed evidence: this report was already presented "
                f"{self.clock() - first:.0f} s ago",
            )  # fmt: skip

    def _verify_snp(self, raw: bytes, table: Any) -> Verdict:
        assert self.policy.snp is not None
        certs = snp.SnpCerts()
        if self._snp_certs is not None:
            certs.extend(self._snp_certs)
        if table:
            if not isinstance(table, list):
                raise BadEvidence("cert_chain is not a list")
            entries = []
            for entry in table:
                if not isinstance(entry, dict):
                    raise BadEvidence("cert_chain entries are objects {cert_type, data}")
                kind = str(entry.get("cert_type", "")).upper()
                entries.append((kind, b64decode(entry.get("data"), f"cert_chain {kind}")))
            certs.extend(snp.SnpCerts.from_table(entries))
        now = (
            dt.datetime.fromtimestamp(self.verify_time, dt.UTC)
            if self.verify_time is not None
            else None
        )
        verdict = snp.verify_report(raw, certs, now=now, roots=self._snp_roots)
        if verdict.verified:
            snp.check_policy(verdict, self.policy.snp)
            if not self.policy.snp.measurements:
                verdict.fail("the policy accepts no measurement (snp.measurements is empty)")
        return verdict

    def _verify_tdx(self, raw: bytes) -> Verdict:
        assert self.policy.tdx is not None
        verdict = tdx.verify_quote(
            raw,
            self._collateral,
            now=self.verify_time,
            accepted_status=tuple(self.policy.tdx.accepted_tcb_status),
            verifier=self.tdx_verifier,
        )
        if verdict.verified:
            tdx.check_policy(verdict, self.policy.tdx)
            if not self.policy.tdx.mrtd:
                verdict.fail("the policy accepts no MRTD (tdx.mrtd is empty)")
        return verdict

    def _token(self, session: Session, now: float) -> str:
        from jwcrypto import jwt

        claims = {
            "iss": "gcvm-broker",
            "iat": int(now),
            "exp": int(now + self.policy.token_ttl_s),
            "jti": session.id,
            "tee": session.tee,
            "tee-pubkey": session.tee_pubkey,
            "attestation": "verified" if session.attested else "none",
            "evaluation": session.claims,
        }
        header = {"alg": "ES256", "typ": "JWT"}
        if self._token_kid is not None:
            header["kid"] = self._token_kid
        token = jwt.JWT(header=header, claims=claims)
        token.make_signed_token(self._token_key)
        return str(token.serialize())

    # --- /kbs/v0/resource/<repository>/<type>/<tag> ----------------------------------------
    def resource(
        self, session_id: str | None, bearer: str | None, name: str, peer: str = ""
    ) -> dict[str, Any]:
        self._request.peer = peer
        now = self.clock()
        pubkey, attested, who, claims = self._authorized(session_id, bearer, now)
        path = self.policy.resources.get(name) or self._from_repository(name)
        if path is None:
            raise self._refuse(
                "resource", HTTPStatus.NOT_FOUND, "ResourceNotFound",
                f"no resource {name!r} at this broker",
            )  # fmt: skip
        self._allowed(name, path, attested, claims)
        with path.open("rb") as f:  # the mode of the file actually read
            why = exposed(os.fstat(f.fileno()))
            payload = f.read() if why is None else b""
        if why is not None:  # a repository file, found at this request, that others may read
            log.warning("resource %s: %s is %s: not released (chmod 600 %s)", name, path, why,
                        path)  # fmt: skip
            raise self._refuse(
                "resource", HTTPStatus.FORBIDDEN, "PolicyDeny",
                f"resource {name!r} is not released: the broker's file for it is {why}",
            )  # fmt: skip
        response = _jwe(payload, pubkey)
        self._record({
            "time": now, "step": "resource", "outcome": "released", "resource": name,
            "who": who, "peer": peer, "tee": claims.get("tee") if attested else "sample",
            "attested": attested, "evaluation": claims, "policy": self.policy.source,
            "policy_sha256": self.policy_digest,
        })  # fmt: skip
        if attested:
            log.info("resource RELEASED: %s to %s (%s %s)", name, who, claims.get("tee"),
                     _summary(str(claims.get("tee")), claims))  # fmt: skip
        else:
            log.warning("resource RELEASED: %s to %s: %s", name, who, INSECURE_LABEL)
        return response

    def _authorized(
        self, session_id: str | None, bearer: str | None, now: float
    ) -> tuple[dict[str, Any], bool, str, dict[str, Any]]:
        if bearer:
            from jwcrypto import jwt

            try:
                token = jwt.JWT(jwt=bearer, key=self._token_key, algs=["ES256"], check_claims=False)
                claims = json.loads(token.claims)
                if not isinstance(claims.get("exp"), int) or now > claims["exp"]:
                    raise ValueError("expired")
            except Exception:  # jwcrypto: invalid signature, malformed; or expired
                raise self._refuse(
                    "resource", HTTPStatus.UNAUTHORIZED, "TokenVerificationFailed",
                    "the bearer token is not this broker's, or has expired",
                ) from None  # fmt: skip
            return (
                claims["tee-pubkey"],
                claims.get("attestation") == "verified",
                f"token {str(claims.get('jti'))[:8]}",
                claims.get("evaluation", {}),
            )
        with self._lock:
            session = self._sessions.get(session_id or "")
        if session is None or session.tee_pubkey is None or session.attested_until is None:
            raise self._refuse(
                "resource", HTTPStatus.UNAUTHORIZED, "UnAuthenticated",
                "this session has not attested: auth and attest first",
            )  # fmt: skip
        if now > session.attested_until:
            raise self._refuse(
                "resource", HTTPStatus.UNAUTHORIZED, "UnAuthenticated",
                "this session's attestation has expired: attest again",
            )  # fmt: skip
        return session.tee_pubkey, session.attested, f"session {session.id[:8]}", session.claims

    def _allowed(self, name: str, path: Path, attested: bool, claims: dict[str, Any]) -> None:
        """A resource bound to measurements goes only to a session that verified one of them."""
        allowed = self.policy.resource_measurements.get(name)
        if allowed is None and name not in self.policy.resources:
            allowed = self._repository_measurements(name, path)
        if allowed is None:  # not bound: any measurement the policy accepts
            return
        tee = str(claims.get("tee"))
        measured = claims.get("measurement" if tee == "snp" else "mr_td") if attested else None
        if not isinstance(measured, str) or measured.lower() not in allowed:
            shown = measured if isinstance(measured, str) else "(none: no attested measurement)"
            raise self._refuse(
                "resource", HTTPStatus.FORBIDDEN, "PolicyDeny",
                f"policy denies resource {name} to measurement {shown}",
            )  # fmt: skip

    def _repository_measurements(self, name: str, path: Path) -> list[str] | None:
        sidecar = path.with_name(f".{path.name}.measurements")
        try:
            text = sidecar.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._refuse("resource", HTTPStatus.FORBIDDEN, "PolicyDeny",
                               f"resource {name}: cannot read its measurement list "
                               f"({exc.strerror})") from None  # fmt: skip
        try:
            return parse_measurements(text, str(sidecar))
        except UsageError as exc:  # a list that does not parse releases to nobody
            raise self._refuse("resource", HTTPStatus.FORBIDDEN, "PolicyDeny",
                               exc.message) from None  # fmt: skip

    # --- helpers -----------------------------------------------------------------------------
    def _refuse(
        self, step: str, status: HTTPStatus, kind: str, detail: str, session: Session | None = None
    ) -> Refusal:
        who = f"session {session.id[:8]} ({session.tee})" if session else "no session"
        log.warning("%s REFUSED: %s: %s", step, who, detail)
        self._decide(step, "refused", session, reason=detail)
        return Refusal(status, kind, detail)

    def _from_repository(self, name: str) -> Path | None:
        if self.repository is None:
            return None
        parts = name.split("/")
        if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
            return None
        root = self.repository.resolve()
        path = root.joinpath(*parts)
        try:
            inside = path.resolve().is_relative_to(root)
        except OSError:
            return None
        return path if inside and path.is_file() else None

    def _record(self, decision: dict[str, Any]) -> None:
        self.decisions.append(decision)
        if self.on_decision is not None:
            try:
                self.on_decision(decision)
            except Exception:  # a full disk must not stop the broker's answers
                log.exception("cannot record a decision")

    def _decide(self, step: str, outcome: str, session: Session | None, **facts: Any) -> None:
        self._record({
            "time": self.clock(), "step": step, "outcome": outcome,
            "who": f"session {session.id[:8]}" if session else "no session",
            "peer": (session.peer if session and session.peer
                     else getattr(self._request, "peer", "")),
            "tee": session.tee if session else None, "policy": self.policy.source,
            "policy_sha256": self.policy_digest, **facts,
        })  # fmt: skip


def _file_digest(source: str) -> str | None:
    path = Path(source)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except OSError:
        return None


def _summary(tee: str, claims: dict[str, Any]) -> str:
    if tee == "snp":
        tcb = claims.get("reported_tcb", {})
        return (
            f"measurement {str(claims.get('measurement'))[:16]}..., VMPL {claims.get('vmpl')}, "
            f"TCB {tcb}, signed by {claims.get('signing_key')}"
        )
    if tee == "tdx":
        return f"MRTD {str(claims.get('mr_td'))[:16]}..., TCB status {claims.get('tcb_status')}"
    return ""


def _jwe(payload: bytes, pubkey: dict[str, Any]) -> dict[str, Any]:
    """A flattened JWE (A256GCM), content key wrapped to the tee-pubkey (ECDH-ES+A256KW or
    RSA-OAEP-256), as Trustee's KBS returns a resource."""
    from jwcrypto import jwe, jwk

    key = jwk.JWK(**{k: v for k, v in pubkey.items() if k in ("kty", "crv", "x", "y", "n", "e")})
    alg = "ECDH-ES+A256KW" if pubkey["kty"] == "EC" else "RSA-OAEP-256"
    token = jwe.JWE(payload, protected=json.dumps({"alg": alg, "enc": "A256GCM"}))
    token.add_recipient(key)
    # the compact form puts every header (epk included) in the protected one, as Trustee does
    protected, encrypted_key, iv, ciphertext, tag = token.serialize(compact=True).split(".")
    return {
        "protected": protected,
        "encrypted_key": encrypted_key,
        "iv": iv,
        "ciphertext": ciphertext,
        "tag": tag,
    }
