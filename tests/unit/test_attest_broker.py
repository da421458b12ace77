"""The broker's KBS protocol end to end over loopback HTTP: the guest's real client
(groupcover.keyrelease) against `gcvm broker`'s server, with SEV-SNP reports signed by a test
chain made here (fake ARK -> ASK -> VCEK) and produced through a configfs-tsm fake, so every
refusal runs the real attest + JWE path: replay, foreign nonce, expired nonce, reused nonce, debug,
unknown measurement, wrong report data, bad signature, untrusted chain, low TCB; the TDX path with
the real dcap-qvl quote and, for chosen values, a labelled fake quote verifier; and the insecure
path, labelled "model key released without attestation"."""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from groupcover.keyrelease import (
    INSECURE_LABEL,
    ConfigfsTsm,
    KbsClient,
    KeyReleaseRefused,
    NoEvidence,
    report_data_for,
)
from groupcover.keyrelease.jwe import EphemeralKey
from orchestrator.attest import kbs
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.identity import load_or_create
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from tests.unit.attest_testchain import (
    GOOD_MEASUREMENT,
    TCB,
    FakeTsm,
    SnpTestChain,
    fake_quote_verifier,
    tdx_quote,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "attestation" / "tdx"
MODEL_KEY = bytes(range(32))
RESOURCE = "gcvm/model/key"


def write_key(path: Path, key: bytes = MODEL_KEY) -> None:
    """A key file as the owner keeps one: mode 0600 (the broker releases no key others can read)."""
    path.write_bytes(key)
    path.chmod(0o600)


@pytest.fixture(scope="module")
def chain() -> SnpTestChain:
    return SnpTestChain.make()


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path: Path, chain: SnpTestChain):
    """A broker with an SNP policy (the test chain's ARK as root) on 127.0.0.1:<free port>."""
    certs, _ = chain.write(tmp_path)
    write_key(tmp_path / "model.key")
    policy = parse_policy(
        {
            "nonce_ttl_s": 30,
            "snp": {
                "measurements": [GOOD_MEASUREMENT.hex()],
                "min_tcb": dict(TCB),
                "vmpl": [0],
                "certs": "certs",
                "roots": "roots.pem",
            },
            "resources": {RESOURCE: "model.key"},
        },
        tmp_path,
    )
    clock = Clock()
    identity = load_or_create(tmp_path / "identity")
    broker = Broker(policy, clock=clock, identity=identity)
    server = serve_in_thread(broker, "127.0.0.1", 0)  # plain HTTP: raw protocol tests
    tls = serve_in_thread(broker, "127.0.0.1", 0, identity=identity)  # what a master pins
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {"broker": broker, "url": url, "clock": clock, "tmp": tmp_path, "certs": certs,
               "tls_url": tls.url, "pin": identity.cert_der}  # fmt: skip
    finally:
        for s in (server, tls):
            s.shutdown()
            s.server_close()


def tsm(tmp_path: Path, chain: SnpTestChain, table: bool = True, **report_args: Any) -> ConfigfsTsm:
    fake = FakeTsm(
        tmp_path / "tsm",
        "sev_guest",
        lambda inblob: chain.report(inblob, **report_args),
        chain.cert_table() if table else b"",
    )
    source = ConfigfsTsm(root=tmp_path / "tsm", fs=fake, tee="snp")
    return source


class Recorder:
    """An evidence source that delegates and keeps what it produced (to replay it)."""

    def __init__(self, inner, tamper=None, before=None) -> None:
        self.inner = inner
        self.tee = inner.tee
        self.tamper = tamper
        self.before = before
        self.last: dict[str, Any] | None = None

    def collect(self, report_data: bytes) -> dict[str, Any]:
        if self.before:
            self.before()
        evidence = self.inner.collect(report_data)
        if self.tamper:
            evidence = self.tamper(evidence)
        self.last = evidence
        return evidence


class Replay:
    tee = "snp"

    def __init__(self, evidence: dict[str, Any]) -> None:
        self.evidence = evidence

    def collect(self, report_data: bytes) -> dict[str, Any]:
        return self.evidence


def refused(url: str, source, match: str) -> str:
    with pytest.raises(KeyReleaseRefused) as info:
        KbsClient(url, source, timeout=10).get_resource(RESOURCE)
    assert match in info.value.message, info.value.message
    return info.value.message


def test_snp_attest_and_jwe_release(world, chain, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gcvm.broker")
    source = tsm(world["tmp"], chain)
    client = KbsClient(world["tls_url"], source, world["pin"], timeout=10, clock=world["clock"])
    release = client.get_resource(RESOURCE)
    assert release.secret == MODEL_KEY
    assert release.attested and release.authenticated and release.tee == "snp"
    assert release.label == "model key released after snp attestation"
    assert release.claims["evaluation"]["measurement"] == GOOD_MEASUREMENT.hex()
    assert release.claims["tee-pubkey"]["crv"] == "P-256"
    assert source.fs.removed  # one configfs-tsm entry per request, removed after use
    text = caplog.text
    assert "attest ACCEPTED" in text and "resource RELEASED: gcvm/model/key" in text


def test_kbs_protocol_0_4_composite_evidence(world, chain) -> None:
    # Trustee's current shape: tee-evidence {primary_evidence, additional_evidence}, and the
    # hashed runtime data includes "additional-evidence"
    client = KbsClient(world["url"], tsm(world["tmp"], chain), protocol="0.4.0")
    assert client.get_resource(RESOURCE).secret == MODEL_KEY


def test_evidence_without_cert_table_uses_the_brokers_certs(tmp_path, chain) -> None:
    chain.write(tmp_path)
    write_key(tmp_path / "k")
    policy = parse_policy(
        {"snp": {"measurements": [GOOD_MEASUREMENT.hex()], "certs": "certs", "roots": "roots.pem"},
         "resources": {RESOURCE: "k"}},
        tmp_path,
    )  # fmt: skip
    server = serve_in_thread(Broker(policy), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        release = KbsClient(url, tsm(tmp_path, chain, table=False)).get_resource(RESOURCE)
        assert release.secret == MODEL_KEY
    finally:
        server.shutdown()
        server.server_close()


def test_replayed_report_is_refused(world, chain) -> None:
    first = Recorder(tsm(world["tmp"], chain))
    KbsClient(world["url"], first).get_resource(RESOURCE)
    refused(world["url"], Replay(first.last), "replayed evidence")


def test_report_bound_to_another_key_is_refused(world, chain) -> None:
    # a report made for someone else's nonce and key: fresh signature, wrong binding
    other = report_data_for("someone else's nonce", EphemeralKey().public_jwk)
    evidence = {"attestation_report": base64.b64encode(chain.report(other)).decode()}
    refused(world["url"], Replay(evidence), "report data does not bind this session's nonce")


def test_wrong_report_data_is_refused(world, chain) -> None:
    source = Recorder(tsm(world["tmp"], chain))
    source.inner.fs.make = lambda inblob: chain.report(bytes(64))
    refused(world["url"], source, "report data does not bind")


def test_expired_nonce_is_refused(world, chain) -> None:
    clock = world["clock"]

    def later() -> None:
        clock.t += 31  # the policy's nonce_ttl_s is 30

    refused(world["url"], Recorder(tsm(world["tmp"], chain), before=later), "nonce expired")


def post(url: str, path: str, body: dict[str, Any], cookie: str | None = None):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers.get("Set-Cookie")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), None


def auth(url: str, tee: str = "snp") -> tuple[str, str]:
    status, challenge, cookie = post(url, "/kbs/v0/auth", {"version": "0.1.1", "tee": tee,
                                                           "extra-params": ""})  # fmt: skip
    assert status == 200 and cookie
    assert set(challenge) == {"nonce", "extra-params"}
    assert len(base64.b64decode(challenge["nonce"])) == 32
    return challenge["nonce"], cookie.split(";")[0]


def test_foreign_nonce_and_reused_nonce_are_refused(world, chain) -> None:
    url = world["url"]
    nonce_a, cookie_a = auth(url)
    _, cookie_b = auth(url)
    key = EphemeralKey()
    report = chain.report(report_data_for(nonce_a, key.public_jwk))
    body = {
        "runtime-data": {"nonce": nonce_a, "tee-pubkey": key.public_jwk},
        "tee-evidence": {"attestation_report": base64.b64encode(report).decode()},
    }
    status, error, _ = post(url, "/kbs/v0/attest", body, cookie_b)  # session B, nonce A
    assert status == 401
    assert error == {
        "type": "https://github.com/confidential-containers/kbs/errors/RcarAttestFailed",
        "detail": "the nonce in runtime-data is not this session's nonce",
    }
    status, token, _ = post(url, "/kbs/v0/attest", body, cookie_a)
    assert status == 200 and token["token"].count(".") == 2
    status, error, _ = post(url, "/kbs/v0/attest", body, cookie_a)
    assert status == 401 and error["detail"].startswith("nonce already used")
    status, error, _ = post(url, "/kbs/v0/attest", body, None)
    assert status == 401 and error["detail"].startswith("no such session")


@pytest.mark.parametrize(
    ("report_args", "reason"),
    [
        ({"policy": 0x30000 | (1 << 19)}, "guest policy allows debugging"),
        ({"measurement": bytes(48)}, "unknown measurement"),
        ({"vmpl": 2}, "VMPL 2 is not accepted"),
        ({"tcb": TCB | {"microcode": 100}}, "reported TCB does not match the VCEK"),
        ({"chip_id": bytes(64)}, "chip id is masked"),
        ({"chip_id": b"\1" * 64}, "chip id does not match"),
    ],
)
def test_policy_refusals(world, chain, report_args, reason) -> None:
    refused(world["url"], tsm(world["tmp"], chain, **report_args), reason)


def test_tcb_below_minimum_is_refused(tmp_path, chain) -> None:
    write_key(tmp_path / "k")
    chain.write(tmp_path)
    policy = parse_policy(
        {"snp": {"measurements": [GOOD_MEASUREMENT.hex()], "roots": "roots.pem",
                 "min_tcb": {"microcode": 200}}, "resources": {RESOURCE: "k"}},
        tmp_path,
    )  # fmt: skip
    server = serve_in_thread(Broker(policy), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        refused(url, tsm(tmp_path, chain), "TCB below the policy's minimum: microcode 115 < 200")
    finally:
        server.shutdown()
        server.server_close()


def test_bad_signature_is_refused(world, chain) -> None:
    def flip(evidence: dict[str, Any]) -> dict[str, Any]:
        raw = bytearray(base64.b64decode(evidence["attestation_report"]))
        raw[0x90] ^= 1
        return evidence | {"attestation_report": base64.b64encode(bytes(raw)).decode()}

    refused(world["url"], Recorder(tsm(world["tmp"], chain), tamper=flip),
            "report signature does not verify")  # fmt: skip


def test_untrusted_chain_is_refused(world) -> None:
    stranger = SnpTestChain.make()  # a chain whose ARK the policy does not name
    refused(world["url"], tsm(world["tmp"], stranger), "is not a trusted root")


def test_resource_needs_attestation_and_exists(world, chain) -> None:
    url = world["url"]
    _, cookie = auth(url)
    request = urllib.request.Request(url + f"/kbs/v0/resource/{RESOURCE}")
    request.add_header("Cookie", cookie)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
    # attested, then an unknown resource: 404; a bearer token works without the cookie
    client = KbsClient(url, tsm(world["tmp"], chain))
    key, claims = client.attest()
    with pytest.raises(KeyReleaseRefused, match="404"):
        client._call("GET", "/kbs/v0/resource/gcvm/model/other")
    token = client.token
    assert token and claims["attestation"] == "verified"
    request = urllib.request.Request(url + f"/kbs/v0/resource/{RESOURCE}")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert key.decrypt(json.loads(response.read())) == MODEL_KEY
    request = urllib.request.Request(url + f"/kbs/v0/resource/{RESOURCE}")
    request.add_header("Authorization", f"Bearer {token[:-4]}AAAA")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


def test_another_guest_cannot_unwrap_the_release(world, chain) -> None:
    client = KbsClient(world["url"], tsm(world["tmp"], chain))
    client.attest()
    response = client._call("GET", f"/kbs/v0/resource/{RESOURCE}")
    from groupcover.keyrelease.jwe import JweError

    with pytest.raises(JweError, match="not wrapped to this guest's key"):
        EphemeralKey().decrypt(response)


def test_sample_tee_is_refused_without_the_insecure_option(world) -> None:
    refused(world["url"], NoEvidence(), "not started with --insecure-no-attestation")


def test_insecure_release_is_labelled(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gcvm.broker")
    write_key(tmp_path / "k")
    policy = parse_policy({"resources": {RESOURCE: "k"}}, tmp_path)
    server = serve_in_thread(Broker(policy, insecure_no_attestation=True), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        release = KbsClient(url, NoEvidence()).get_resource(RESOURCE)
    finally:
        server.shutdown()
        server.server_close()
    assert release.secret == MODEL_KEY
    assert not release.attested
    assert release.label == INSECURE_LABEL == "model key released without attestation"
    assert release.claims["attestation"] == "none"
    assert f"resource RELEASED: {RESOURCE} to session" in caplog.text
    assert INSECURE_LABEL in caplog.text
    from orchestrator import report

    (decision,) = [d for d in server.broker.decisions if d["outcome"] == "released"]
    assert decision["attested"] is False and decision["peer"] == "127.0.0.1"
    verdict = report.broker_verdicts(server.broker.decisions, {"127.0.0.1": "m0"})["m0"]
    assert verdict["attested"] is False and verdict["claims"] == {"warning": INSECURE_LABEL}


def test_protocol_errors(world) -> None:
    url = world["url"]
    status, error, _ = post(url, "/kbs/v0/auth", {"version": "9.9", "tee": "snp"})
    assert status == 401 and "version '9.9' is not supported" in error["detail"]
    status, error, _ = post(url, "/kbs/v0/auth", {"version": "0.1.1", "tee": "tdx"})
    assert status == 401 and "no tdx section" in error["detail"]
    status, error, _ = post(url, "/kbs/v0/nothing", {})
    assert status == 404


# --- TDX through the broker -----------------------------------------------------------------


class QuoteSource:
    tee = "tdx"

    def __init__(self, make) -> None:
        self.make = make

    def collect(self, report_data: bytes) -> dict[str, Any]:
        return {"quote": base64.b64encode(self.make(report_data)).decode(), "cc_eventlog": None}


def tdx_broker(tmp_path: Path, tdx_policy: dict[str, Any], **kwargs: Any):
    write_key(tmp_path / "k")
    policy = parse_policy({"tdx": tdx_policy, "resources": {RESOURCE: "k"}}, tmp_path)
    identity = load_or_create(tmp_path / "identity")
    server = serve_in_thread(Broker(policy, identity=identity, **kwargs), "127.0.0.1", 0,
                             identity=identity)  # fmt: skip
    return server, server.url


def test_real_tdx_quote_through_the_broker_is_refused_for_its_binding(tmp_path) -> None:
    # dcap-qvl verifies the real quote (signature, chain, collateral, UpToDate) on the broker's
    # path; its fixed report data cannot bind this session's nonce, so it is refused for that
    collateral = FIX / "dcapqvl-tdx-quote-v4.collateral.json"
    raw = (FIX / "dcapqvl-tdx-quote-v4.bin").read_bytes()
    server, url = tdx_broker(
        tmp_path,
        {"mrtd": [raw[184:232].hex()], "collateral": str(collateral)},
        verify_time=1750331763,
    )
    try:
        refused(url, QuoteSource(lambda rd: raw), "report data does not bind")
    finally:
        server.shutdown()
        server.server_close()


def test_synthetic_tdx_quotes_with_a_fake_quote_verifier(tmp_path) -> None:
    """LABELLED FAKE: `fake_quote_verifier` stands in for dcap-qvl (no Intel-signed quote can be
    made here); everything after the signature check (binding, MRTD, RTMRs, debug) is real."""
    good_mrtd = bytes([7]) * 48
    (tmp_path / "collateral.json").write_text("{}")
    server, url = tdx_broker(
        tmp_path,
        {"mrtd": [good_mrtd.hex()], "rtmrs": [[None, None, None, bytes(48).hex()]],
         "collateral": "collateral.json"},
        tdx_verifier=fake_quote_verifier,
    )  # fmt: skip
    try:
        pin = server.identity.cert_der
        release = KbsClient(url, QuoteSource(lambda rd: tdx_quote(rd)), pin).get_resource(RESOURCE)
        assert release.secret == MODEL_KEY and release.attested and release.tee == "tdx"
        refused(url, QuoteSource(lambda rd: tdx_quote(rd, td_attributes=0x10000001)),
                "TD attributes have DEBUG set")  # fmt: skip
        refused(url, QuoteSource(lambda rd: tdx_quote(rd, mrtd=bytes(48))), "unknown MRTD")
        refused(url, QuoteSource(lambda rd: tdx_quote(rd, rtmrs=(bytes(48),) * 3 + (b"\1" * 48,))),
                "RTMRs match none")  # fmt: skip
        refused(url, QuoteSource(lambda rd: tdx_quote(bytes(64))), "report data does not bind")

        def forged(rd: bytes) -> bytes:
            q = bytearray(tdx_quote(rd))
            q[200] ^= 1
            return bytes(q)

        refused(url, QuoteSource(forged), "quote verification failed")
    finally:
        server.shutdown()
        server.server_close()


def test_broker_serves_only_the_given_address(world) -> None:
    assert world["url"].startswith("http://127.0.0.1:")
    assert kbs.INSECURE_LABEL == INSECURE_LABEL


# --- the commands, as processes -----------------------------------------------------------


def _start_broker(args: list[str]):
    import select
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "broker", "serve", "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if "broker listening on http" in line:  # https with an identity
                proc.listening = line  # type: ignore[attr-defined]
                return proc, line.split("broker listening on ")[1].split()[0]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError("the broker did not start")


def _stop(proc) -> str:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except Exception:
        proc.kill()
        raise
    return err


def _guest(url: str, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "groupcover.keyrelease", "--broker", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_broker_serve_and_guest_client_processes_insecure(tmp_path: Path) -> None:
    write_key(tmp_path / "model.key")
    log_file = tmp_path / "broker.log"
    proc, url = _start_broker(
        ["--resource", f"{RESOURCE}={tmp_path / 'model.key'}", "--insecure-no-attestation",
         "--log", str(log_file)]
    )  # fmt: skip
    try:
        assert url.startswith("http://127.0.0.1:")
        out = tmp_path / "released.key"
        result = _guest(url, "--tee", "none", "--out", str(out))
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["attested"] is False and doc["label"] == INSECURE_LABEL
        assert out.read_bytes() == MODEL_KEY and (out.stat().st_mode & 0o777) == 0o600
    finally:
        err = _stop(proc)
    assert "broker stopped" in err
    assert INSECURE_LABEL in log_file.read_text()


def test_broker_serve_refuses_a_guest_without_tee(tmp_path: Path, chain) -> None:
    chain.write(tmp_path)
    write_key(tmp_path / "model.key")
    (tmp_path / "policy.yaml").write_text(
        f"snp:\n  measurements: ['{GOOD_MEASUREMENT.hex()}']\n  roots: roots.pem\n"
        f"resources:\n  {RESOURCE}: model.key\n"
    )
    proc, url = _start_broker(["--policy", str(tmp_path / "policy.yaml")])
    try:
        result = _guest(url, "--tee", "none")
        assert result.returncode == 1
        assert "not started with --insecure-no-attestation" in result.stderr
    finally:
        err = _stop(proc)
    assert "auth REFUSED" in err


def test_attested_session_and_token_expire(world, chain) -> None:
    client = KbsClient(world["url"], tsm(world["tmp"], chain))
    client.attest()
    world["clock"].t += 301  # token_ttl_s defaults to 300
    with pytest.raises(KeyReleaseRefused, match="attestation has expired"):
        client._call("GET", f"/kbs/v0/resource/{RESOURCE}")
    request = urllib.request.Request(world["url"] + f"/kbs/v0/resource/{RESOURCE}")
    request.add_header("Authorization", f"Bearer {client.token}")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


def test_every_refusal_is_logged(world, chain, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gcvm.broker")
    refused(world["url"], tsm(world["tmp"], chain, measurement=bytes(48)), "unknown measurement")
    assert "attest REFUSED: session" in caplog.text and "unknown measurement" in caplog.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"snp": {"allow_debug": True}}, "snp.allow_debug must be false"),
        ({"tdx": {"mrtd": ["00"]}}, "expected 48"),
        ({"snp": {"min_tcb": {"bios": 1}}}, "snp.min_tcb takes"),
        ({"resources": {"a/b": "x"}}, "is not <repository>/<type>/<tag>"),
        ({"snp": {"measurment": []}}, "unknown key(s) measurment in snp"),
    ],
)
def test_policy_file_errors(tmp_path: Path, data, message) -> None:
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError) as info:
        parse_policy(data, tmp_path)
    assert message in info.value.message


def test_verify_cli_applies_a_policy(tmp_path: Path) -> None:
    import subprocess
    import sys

    snp_dir = Path(__file__).resolve().parents[1] / "fixtures" / "attestation" / "snp"
    (tmp_path / "policy.yaml").write_text(f"snp:\n  measurements: ['{'00' * 48}']\n")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "attest", "verify",
         str(snp_dir / "virtee-report-milan-v2.hex"), "--certs", str(snp_dir),
         "--policy", str(tmp_path / "policy.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "unknown measurement 7a1e5c266c0108db" in result.stderr


@pytest.mark.parametrize(
    ("evidence", "reason"),
    [
        ({"attestation_report": base64.b64encode(bytes(600)).decode()}, "1184 bytes, this one 600"),
        ({"attestation_report": "%%% not base64"}, "attestation_report is not base64"),
        ({}, "attestation_report must be a base64 string"),
        ({"attestation_report": base64.b64encode(bytes(1184)).decode(),
          "cert_chain": [{"cert_type": "vcek", "data": base64.b64encode(b"junk").decode()}]},
         "is not an X.509 certificate"),
    ],
)  # fmt: skip
def test_malformed_evidence_is_refused_with_its_reason(world, evidence, reason) -> None:
    refused(world["url"], Replay(evidence), reason)


def test_rsa_tee_pubkey_gets_rsa_oaep_256() -> None:
    from jwcrypto import jwe, jwk

    private = jwk.JWK.generate(kty="RSA", size=2048)
    response = kbs._jwe(b"key", json.loads(private.export_public()))
    token = jwe.JWE()
    token.deserialize(json.dumps(response), key=private)
    assert token.payload == b"key"
    assert json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))["alg"] == (
        "RSA-OAEP-256"
    )


def test_the_broker_records_each_decision_with_its_client(world, chain) -> None:
    """What the results show per master comes from the broker's own record (client address,
    verified claims, policy), not from the guest's word: an accepted release and a refused
    replay, both from 127.0.0.1, over real HTTP."""
    from orchestrator import report

    first = Recorder(tsm(world["tmp"], chain))
    KbsClient(world["url"], first).get_resource(RESOURCE)
    refused(world["url"], Replay(first.last), "replayed evidence")
    decisions = list(world["broker"].decisions)
    released = [d for d in decisions if d["outcome"] == "released"]
    assert len(released) == 1 and released[0]["peer"] == "127.0.0.1"
    assert released[0]["attested"] and released[0]["tee"] == "snp"
    assert released[0]["evaluation"]["measurement"] == GOOD_MEASUREMENT.hex()
    assert released[0]["policy_sha256"] is None  # a policy built in the test, not a file
    refusal = [d for d in decisions if d["outcome"] == "refused"]
    assert refusal and "replayed evidence" in refusal[0]["reason"]
    assert refusal[0]["peer"] == "127.0.0.1" and refusal[0]["step"] == "attest"
    verdicts = report.broker_verdicts(decisions, {"127.0.0.1": "c-master0"})
    mine = verdicts["c-master0"]
    assert mine["released"] == [RESOURCE] and mine["attested"] is True and mine["tee"] == "snp"
    assert mine["claims"]["measurement"] == GOOD_MEASUREMENT.hex()
    assert any("replayed evidence" in r for r in mine["refused"])
    assert report.broker_table(verdicts).row_count == 1
