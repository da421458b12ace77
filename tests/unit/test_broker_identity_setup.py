"""The broker's identity on disk and on the command line: a P-256 key that is 0600 from its
first byte and refused once others can read it, a certificate that must be the key's, the pin
parameter the orchestrator prints (byte for byte what the framework parses), and `gcvm broker
serve --identity` serving HTTPS to a pinned guest process."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from groupcover import trust
from orchestrator import clusterbroker, runbroker
from orchestrator.attest import identity as ident_mod
from orchestrator.attest.identity import load, load_or_create
from orchestrator.errors import UsageError
from tests.unit.test_attest_broker import MODEL_KEY, RESOURCE, _guest, _start_broker, _stop


def test_made_once_with_a_private_key_file_and_a_matching_certificate(tmp_path: Path) -> None:
    old = os.umask(0)  # even a careless umask: the key is created 0600, not chmod-ed later
    try:
        made = load_or_create(tmp_path / "id")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "id" / "broker.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "id").stat().st_mode) == 0o700
    again = load_or_create(tmp_path / "id")
    assert again.fingerprint == made.fingerprint and again.key_pem == made.key_pem
    from cryptography import x509

    cert = x509.load_der_x509_certificate(made.cert_der)
    assert cert.subject.rfc4514_string() == "CN=gcvm key broker"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days >= 3650


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    made = load_or_create(tmp_path / "id")
    made.key_file.chmod(0o640)
    with pytest.raises(UsageError, match="readable by others"):
        load(tmp_path / "id")


def test_a_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    load_or_create(tmp_path / "a")
    other = load_or_create(tmp_path / "b")
    (tmp_path / "a" / "broker.pem").write_bytes(other.cert_file.read_bytes())
    with pytest.raises(UsageError, match="is not the certificate of"):
        load(tmp_path / "a")


def test_a_certificate_without_its_key_is_not_silently_replaced(tmp_path: Path) -> None:
    made = load_or_create(tmp_path / "id")
    made.key_file.unlink()
    with pytest.raises(UsageError, match="without its key"):
        load_or_create(tmp_path / "id")


def test_the_pin_parameter_is_what_the_framework_parses(tmp_path: Path) -> None:
    made = load_or_create(tmp_path / "id")
    assert made.cmdline_param == trust.cmdline_params(made.cert_der, None)  # byte for byte
    assert ident_mod.BROKER_CERT_PARAM == trust.BROKER_CERT_PARAM
    pins = trust.parse_cmdline(f"ro {made.cmdline_param} quiet")
    assert pins.broker_cert == made.cert_der and pins.measured
    assert trust.read_broker_cert(made.cert_file) == made.cert_der  # the PEM file pins the same


def test_the_identity_command_makes_and_shows_it(tmp_path: Path) -> None:
    from orchestrator.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["broker", "identity", str(tmp_path / "id")])
    assert first.exit_code == 0, first.output
    made = load(tmp_path / "id")
    text = " ".join(first.output.split())
    assert f"certificate sha256 {made.fingerprint}" in text and "(made)" in text
    assert made.cmdline_param in first.output.replace("\n", "")
    second = runner.invoke(app, ["broker", "identity", str(tmp_path / "id")])
    assert "(existing)" in second.output and made.fingerprint in second.output


def test_the_cluster_broker_reads_an_https_listening_line() -> None:
    line = "broker listening on https://10.0.0.1:4443 (identity sha256 ab; policy p; resources -)"
    assert clusterbroker._LISTENING.search(line)[1] == "https://10.0.0.1:4443"
    plain = "broker listening on http://10.0.0.1:80 (no identity: plain HTTP, an unauth...)"
    assert clusterbroker._LISTENING.search(plain)[1] == "http://10.0.0.1:80"


def test_broker_serve_with_an_identity_and_a_pinned_guest_process(tmp_path: Path) -> None:
    (tmp_path / "model.key").write_bytes(MODEL_KEY)
    (tmp_path / "model.key").chmod(0o600)
    made = load_or_create(tmp_path / "id")
    key = tmp_path / "model.key"
    proc, url = _start_broker([
        "--resource", f"{RESOURCE}={key}", "--insecure-no-attestation", "--identity",
        str(tmp_path / "id"),
    ])  # fmt: skip
    assert f"(identity sha256 {made.fingerprint};" in proc.listening
    try:
        assert url.startswith("https://127.0.0.1:")
        out = tmp_path / "released.key"
        result = _guest(url, "--tee", "none", "--out", str(out),
                        "--broker-cert", str(made.cert_file))  # fmt: skip
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["broker_authenticated"] is True and doc["attested"] is False
        assert doc["broker_identity"]["broker_cert_sha256"] == made.fingerprint
        assert out.read_bytes() == MODEL_KEY
        plain = _guest(url.replace("https", "http"), "--tee", "none",
                       "--broker-cert", str(made.cert_file))  # fmt: skip
        assert plain.returncode == 3 and "http:// cannot authenticate" in plain.stderr
    finally:
        _stop(proc)


def test_broker_serve_without_an_identity_says_it_is_unauthenticated(tmp_path: Path) -> None:
    (tmp_path / "model.key").write_bytes(MODEL_KEY)
    (tmp_path / "model.key").chmod(0o600)
    proc, url = _start_broker(["--resource", f"{RESOURCE}={tmp_path / 'model.key'}",
                               "--insecure-no-attestation"])  # fmt: skip
    _stop(proc)
    assert url.startswith("http://")
    assert "(no identity: plain HTTP, an unauthenticated demo/test broker;" in proc.listening


def test_a_run_broker_with_an_identity_serves_https_to_a_pinned_master(tmp_path: Path) -> None:
    from groupcover.keyrelease import KbsClient, NoEvidence

    (tmp_path / "model.key").write_bytes(MODEL_KEY)

    (tmp_path / "model.key").chmod(0o600)
    made = load_or_create(tmp_path / "id")
    broker = runbroker.RunBroker(None, "127.0.0.1", {RESOURCE: tmp_path / "model.key"}, "none",
                                identity=tmp_path / "id")  # fmt: skip
    assert broker.argv()[-2:] == ["--identity", str(tmp_path / "id")]
    with broker:
        assert broker.url.startswith("https://127.0.0.1:")
        release = KbsClient(broker.url, NoEvidence(), made.cert_der).get_resource(RESOURCE)
    assert release.secret == MODEL_KEY and release.authenticated
