"""Where a master's pins come from: the measured kernel command line wins, the host's argv may
only fill in where nothing is measured, and a pin that differs is refused."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from groupcover import trust


def _cert(tmp: Path, name: str) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))  # fmt: skip
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert.public_bytes(serialization.Encoding.DER)


def _owner(tmp: Path, name: str) -> tuple[Path, bytes]:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    path = tmp / f"{name}.pub"
    path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return path, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_cmdline_round_trip_and_size(tmp_path: Path) -> None:
    _, der = _cert(tmp_path, "broker")
    _, raw = _owner(tmp_path, "owner")
    params = trust.cmdline_params(der, raw)
    assert len(params) < 1024  # x86 COMMAND_LINE_SIZE is 2048 with the rest of the line
    pins = trust.parse_cmdline(f"root=/dev/vda rw {params} console=ttyS0")
    assert (pins.broker_cert, pins.owner_key, pins.measured) == (der, raw, True)
    assert trust.parse_cmdline("root=/dev/vda rw") == trust.Pins()


@pytest.mark.parametrize("line", [
    "gcvm.owner_key=AAAA", "gcvm.broker_cert=notacert", "gcvm.owner_key=!!",
])  # fmt: skip
def test_malformed_pins_refused(line: str) -> None:
    with pytest.raises(trust.TrustError):
        trust.parse_cmdline(line)


def test_a_pin_given_twice_is_refused(tmp_path: Path) -> None:
    _, a = _owner(tmp_path, "a")
    _, b = _owner(tmp_path, "b")
    line = f"{trust.cmdline_params(None, a)} {trust.cmdline_params(None, b)}"
    with pytest.raises(trust.TrustError, match="twice"):
        trust.parse_cmdline(line)


def test_argv_cannot_replace_a_measured_pin(tmp_path: Path) -> None:
    good_cert, der = _cert(tmp_path, "broker")
    evil_cert, _ = _cert(tmp_path, "impostor")
    good_owner, raw = _owner(tmp_path, "owner")
    evil_owner, _ = _owner(tmp_path, "evil")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=/dev/vda {trust.cmdline_params(der, raw)}\n")
    measured = trust.measured_pins(cmdline)
    with pytest.raises(trust.TrustError, match="broker certificate pinned in the measured boot"):
        trust.resolve(evil_cert, None, measured)
    with pytest.raises(trust.TrustError, match="owner key pinned in the measured boot"):
        trust.resolve(None, evil_owner, measured)
    assert trust.resolve(good_cert, good_owner, measured) == measured  # the same pin: fine
    assert trust.resolve(None, None, measured).source == trust.MEASURED


def test_argv_pins_only_where_nothing_is_measured(tmp_path: Path) -> None:
    cert, der = _cert(tmp_path, "broker")
    owner, raw = _owner(tmp_path, "owner")
    pins = trust.resolve(cert, owner, trust.Pins())
    assert (pins.broker_cert, pins.owner_key, pins.source) == (der, raw, trust.GIVEN)
    assert trust.resolve(None, None, trust.Pins()).source == trust.NONE
    assert trust.measured_pins(tmp_path / "absent") == trust.Pins()


def test_a_private_key_is_not_an_owner_pin(tmp_path: Path) -> None:
    path = tmp_path / "owner.key"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    with pytest.raises(trust.TrustError, match="not a PEM public key"):
        trust.read_owner_key(path)
