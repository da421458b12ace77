"""The master authenticates its key broker: the host owns the network path and can answer in the
broker's place (the red team's impostor: verifies nothing, answers an unsigned token claiming SNP
attestation and a JWE of its own key). With a pinned broker certificate the master refuses plain
HTTP, any TLS peer without the pinned certificate, and any token not ES256-signed by the pinned key,
expired, or bound to another attestation; only then may a release say `attested`. Without a pin
the key still comes, labelled as from an unauthenticated broker and never `attested`. Real sockets
on 127.0.0.1, real certificates, real crypto."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from groupcover import trust
from groupcover.keyrelease import (
    INSECURE_LABEL,
    UNAUTHENTICATED_LABEL,
    BrokerNotAuthenticated,
    KbsClient,
    NoEvidence,
)
from groupcover.keyrelease import cli as keyrelease_cli
from groupcover.package.keys import KeySource, obtain_key
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.identity import Identity, load_or_create
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from tests.unit import test_attest_broker as base
from tests.unit.broker_impostor import (
    IMPOSTOR_KEY,
    Impostor,
    b64url,
    lying_claims,
    unsigned_token,
)
from tests.unit.test_attest_broker import MODEL_KEY, RESOURCE, tsm

chain = base.chain  # the SNP test chain and broker, shared with the protocol's own tests
world = base.world
KEY = bytes(range(32))


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return load_or_create(tmp_path / "identity")


@pytest.fixture
def other(tmp_path: Path) -> Identity:
    return load_or_create(tmp_path / "other")


@pytest.fixture
def genuine(tmp_path: Path, identity: Identity):
    """The owner's broker, with its identity, releasing to guests without a TEE."""
    (tmp_path / "model.key").write_bytes(KEY)
    (tmp_path / "model.key").chmod(0o600)
    policy = parse_policy({"resources": {RESOURCE: "model.key"}}, tmp_path)
    broker = Broker(policy, insecure_no_attestation=True, identity=identity)
    server = serve_in_thread(broker, "127.0.0.1", 0, identity=identity)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _tls(ident: Identity) -> tuple[str, str]:
    return str(ident.cert_file), str(ident.key_file)


# --- the red team's impostor ------------------------------------------------------------------


def test_with_a_pin_plain_http_is_refused_before_any_request(identity) -> None:
    refusal = pytest.raises(BrokerNotAuthenticated, match="pinned; http:// cannot authenticate")
    with Impostor() as imp, refusal:
        KbsClient(imp.url, NoEvidence(), identity.cert_der).get_resource(RESOURCE)
    assert imp.seen == []  # not even the auth request, let alone evidence


def test_with_a_pin_a_tls_impostor_with_its_own_certificate_is_refused(identity, other) -> None:
    with Impostor(tls=_tls(other)) as imp, pytest.raises(BrokerNotAuthenticated) as refused:
        KbsClient(imp.url, NoEvidence(), identity.cert_der).get_resource(RESOURCE)
    message = refused.value.message
    assert f"did not present the pinned certificate (sha256 {identity.fingerprint})" in message
    assert imp.url in message
    assert imp.seen == []  # the handshake failed: no request, no evidence


def test_without_a_pin_the_impostor_gets_no_attested_label() -> None:
    """The red team's exact run: the key comes, and the results say whose word it is."""
    with Impostor() as imp:
        release = KbsClient(imp.url, NoEvidence()).get_resource(RESOURCE)
    assert release.secret == IMPOSTOR_KEY  # nothing can tell, without a pin
    assert release.attested is False and release.authenticated is False
    assert release.label == UNAUTHENTICATED_LABEL
    assert "unauthenticated broker" in release.label and "attestation" not in release.label


# --- tokens from a peer that does present the pinned certificate -----------------------------


def _es256(ident: Identity, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    key = load_pem_private_key(ident.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    head = header or {"alg": "ES256", "typ": "JWT", "kid": ident.fingerprint}
    signing = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _hs256(secret: bytes, claims: dict[str, Any]) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing = f"{head}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64url(mac)}"


def _flip(token: str) -> str:
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 1
    return f"{head}.{body}.{b64url(bytes(raw))}"


FORGERIES = {
    "alg none": (lambda ident, other, pk: unsigned_token(lying_claims(pk)), "alg 'none'"),
    "HS256 keyed with the pinned certificate": (
        lambda ident, other, pk: _hs256(ident.cert_der, lying_claims(pk)), "alg 'HS256'"),
    "ES256 by another key": (
        lambda ident, other, pk: _es256(other, lying_claims(pk),
                                        {"alg": "ES256", "kid": ident.fingerprint}),
        "not signed by the pinned broker"),
    "ES256 naming another kid": (
        lambda ident, other, pk: _es256(other, lying_claims(pk)), "names signing key"),
    "a flipped signature bit": (
        lambda ident, other, pk: _flip(_es256(ident, lying_claims(pk))),
        "not signed by the pinned broker"),
    "expired (genuinely signed)": (
        lambda ident, other, pk: _es256(ident, lying_claims(pk, exp=int(time.time()) - 1)),
        "has expired"),
    "another attestation's tee-pubkey (genuinely signed)": (
        lambda ident, other, pk: _es256(ident, lying_claims({**pk, "x": pk["y"]})),
        "not for this attestation"),
}  # fmt: skip


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_token_not_verifiably_this_attestations_is_refused(identity, other, forgery) -> None:
    make, reason = FORGERIES[forgery]
    # the worst case: the peer holds the pinned certificate's TLS key, only the token is forged
    forger = Impostor(tls=_tls(identity), token=lambda pk: make(identity, other, pk))
    with forger as imp, pytest.raises(BrokerNotAuthenticated, match=reason):
        KbsClient(imp.url, NoEvidence(), identity.cert_der).get_resource(RESOURCE)
    assert [path for _, path, _ in imp.seen] == ["/kbs/v0/auth", "/kbs/v0/attest"]  # no resource


def test_a_genuinely_signed_token_passes_the_same_checks(identity) -> None:
    # the control of the forgeries: the same peer, the same claims, signed right
    with Impostor(tls=_tls(identity), token=lambda pk: _es256(identity, lying_claims(pk))) as imp:
        release = KbsClient(imp.url, NoEvidence(), identity.cert_der).get_resource(RESOURCE)
    assert release.authenticated and release.secret == IMPOSTOR_KEY


# --- the genuine broker -----------------------------------------------------------------------


def test_the_genuine_broker_releases_to_a_pinned_master(genuine, identity) -> None:
    assert genuine.url.startswith("https://127.0.0.1:")
    client = KbsClient(genuine.url, NoEvidence(), identity.cert_der)
    release = client.get_resource(RESOURCE)
    assert release.secret == KEY and release.authenticated
    assert release.attested is False and release.label == INSECURE_LABEL  # tee none stays so
    header = json.loads(base64.urlsafe_b64decode(client.token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": identity.fingerprint}


def test_the_genuine_broker_after_snp_attestation_says_attested(world, chain) -> None:
    source = tsm(world["tmp"], chain)
    release = KbsClient(world["tls_url"], source, world["pin"], clock=world["clock"]).get_resource(
        RESOURCE
    )
    assert release.secret == MODEL_KEY and release.attested and release.authenticated
    assert release.label == "model key released after snp attestation"
    # the same broker and evidence without a pin: the key, but no claim of attestation
    release = KbsClient(world["url"], tsm(world["tmp"], chain)).get_resource(RESOURCE)
    assert release.secret == MODEL_KEY and not release.attested and not release.authenticated
    assert release.label == UNAUTHENTICATED_LABEL


def test_obtain_key_reports_the_brokers_identity(genuine, identity) -> None:
    pins = trust.Pins(broker_cert=identity.cert_der, source=trust.GIVEN)
    release = obtain_key(KeySource(broker=genuine.url, tee="none", pins=pins))
    assert release.key == KEY and release.facts["broker_authenticated"] is True
    expected = {"source": trust.GIVEN, "owner_key": None,
                "broker_cert_sha256": identity.fingerprint}  # fmt: skip
    assert release.facts["broker_identity"] == expected


def test_obtain_key_without_a_pin_from_an_http_broker(tmp_path) -> None:
    (tmp_path / "model.key").write_bytes(KEY)
    (tmp_path / "model.key").chmod(0o600)
    policy = parse_policy({"resources": {RESOURCE: "model.key"}}, tmp_path)
    server = serve_in_thread(Broker(policy, insecure_no_attestation=True), "127.0.0.1", 0)
    try:
        assert server.url.startswith("http://")
        release = obtain_key(KeySource(broker=server.url, tee="none"))
    finally:
        server.shutdown()
        server.server_close()
    assert release.key == KEY and release.facts["attested"] is False
    assert release.facts["broker_authenticated"] is False
    assert release.facts["broker_identity"]["source"] == trust.NONE


# --- the pin comes from the measured boot; the host's argv cannot change it ---------------------


def _measured(monkeypatch, tmp_path: Path, ident: Identity) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 {trust.cmdline_params(ident.cert_der, None)} quiet\n")
    monkeypatch.setattr(trust, "KERNEL_CMDLINE", cmdline)


def test_the_host_cannot_swap_the_measured_pin_by_argv(
    monkeypatch, tmp_path, identity, other, capsys
) -> None:
    _measured(monkeypatch, tmp_path, identity)
    with Impostor(tls=_tls(other)) as imp:
        code = keyrelease_cli.main(["--broker", imp.url, "--tee", "none",
                                    "--broker-cert", str(other.cert_file)])  # fmt: skip
    assert code == 2 and imp.seen == []
    err = capsys.readouterr().err
    assert "differs from the broker certificate pinned in the measured boot" in err
    assert "Traceback" not in err


def test_the_keyrelease_verb_uses_the_measured_pin(
    monkeypatch, tmp_path, genuine, identity, other, capsys
) -> None:
    _measured(monkeypatch, tmp_path, identity)
    assert keyrelease_cli.main(["--broker", genuine.url, "--tee", "none"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["broker_authenticated"] is True and doc["attested"] is False
    assert doc["broker_identity"]["source"] == trust.MEASURED
    with Impostor(tls=_tls(other)) as imp:  # the same master, the host's broker
        assert keyrelease_cli.main(["--broker", imp.url, "--tee", "none"]) == 3
    err = capsys.readouterr().err
    assert "did not present the pinned certificate" in err and "Traceback" not in err


# --- the server: a silent TLS client holds one slot until the deadline, never the server ------


def test_a_client_that_never_says_hello_does_not_stall_the_broker(genuine, identity) -> None:
    genuine.request_deadline_s = 2.0
    silent = [socket.create_connection(genuine.server_address, timeout=5) for _ in range(8)]
    try:
        start = time.monotonic()
        release = KbsClient(genuine.url, NoEvidence(), identity.cert_der, timeout=5).get_resource(
            RESOURCE
        )
        assert release.secret == KEY and time.monotonic() - start < 2.0
        for sock in silent:  # cut at the deadline: the peer's end reads EOF
            sock.settimeout(5)
            assert sock.recv(1) == b""
        assert time.monotonic() - start < 2.0 + 3.0
    finally:
        for sock in silent:
            sock.close()
