"""The verifiers against the real public vectors of tests/fixtures/attestation (README there), and
negative cases built from them: one flipped byte in each signed region, the wrong certificate, a
truncated file, a time after the CRL's next update, the invalid VCEK. Plus `gcvm attest verify`."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from orchestrator.attest import snp, tdx
from orchestrator.attest.common import BadEvidence, expected_report_data

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "attestation"
SNP = FIX / "snp"
TDX = FIX / "tdx"
TDX_NOW = 1750331763  # the collateral's TCB-info issueDate + 1 hour (README)
VLEK_NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # the VLEK is valid 2024-12-10 .. 2025-12-10
VCEK_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def certs(*names: str) -> snp.SnpCerts:
    found = snp.SnpCerts()
    for name in names:
        for cert in snp.load_certificates((SNP / name).read_bytes(), name):
            found.add(cert)
    return found


def report(name: str) -> bytes:
    return snp.read_report_file(SNP / name)


SNP_CASES = [
    # report, its key (+ chain file), VMPL, signing key, now
    ("virtee-report-milan-v2.hex", ("virtee-vcek-milan.der", "virtee-cert-chain-milan.pem"), 0,
     "VCEK", VCEK_NOW),
    ("trustee-report-milan-v2.bin", ("trustee-vcek-milan.der", "amd-milan-ask-ark-asvk.pem"), 0,
     "VCEK", VCEK_NOW),
    ("trustee-report-milan-v3-vlek.bin", ("trustee-vlek-milan.der", "amd-milan-ask-ark-asvk.pem"),
     1, "VLEK", VLEK_NOW),
]  # fmt: skip


@pytest.mark.parametrize(("name", "files", "vmpl", "key", "now"), SNP_CASES)
def test_snp_vectors_verify_signature_and_chain(name, files, vmpl, key, now) -> None:
    verdict = snp.verify_report(report(name), certs(*files), now=now)
    assert verdict.valid, verdict.reason
    assert verdict.claims["vmpl"] == vmpl
    assert verdict.claims["signing_key"] == key
    assert verdict.claims["product"] == "Milan"
    assert not verdict.claims["policy_debug_allowed"]
    assert verdict.verified[0].startswith(f"report signature (ECDSA P-384) by the {key}")
    inter = "SEV-VLEK-Milan" if key == "VLEK" else "SEV-Milan"
    assert verdict.verified[1] == f"chain {key} -> {inter} -> ARK-Milan"


def test_snp_chain_is_built_in_when_only_the_vcek_is_given() -> None:
    verdict = snp.verify_report(
        report("trustee-report-milan-v2.bin"), certs("trustee-vcek-milan.der"), now=VCEK_NOW
    )
    assert verdict.valid, verdict.reason
    assert verdict.claims["reported_tcb"] == {
        "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115
    }  # fmt: skip


def test_vlek_has_no_hardware_id_and_its_tcb_matches() -> None:
    vlek = certs("trustee-vlek-milan.der").vlek[0]
    assert snp.cert_hwid(vlek) is None
    verdict = snp.verify_report(
        report("trustee-report-milan-v3-vlek.bin"), certs("trustee-vlek-milan.der"), now=VLEK_NOW
    )
    assert verdict.claims["reported_tcb"] == snp.cert_tcb(vlek) | {}


def test_invalid_vcek_is_rejected() -> None:
    bad = certs("trustee-vcek-invalid.der").vcek[0]
    assert snp.verify_key_chain(bad, now=VCEK_NOW) == [
        "VCEK chain: signature by SEV-Milan does not verify"
    ]
    good = certs("trustee-vcek-milan.der").vcek[0]
    assert snp.verify_key_chain(good, now=VCEK_NOW) == []
    verdict = snp.verify_report(
        report("trustee-report-milan-v2.bin"), certs("trustee-vcek-invalid.der")
    )
    assert not verdict.valid
    assert "does not verify with the VCEK" in verdict.reason


@pytest.mark.parametrize(
    ("offset", "region"),
    [(0x08, "policy"), (0x50, "report data"), (0x90, "measurement"), (0x180, "reported TCB"),
     (0x1A0, "chip id"), (0x29F, "last signed byte")],
)  # fmt: skip
def test_snp_flipped_byte_in_signed_region_is_refused(offset: int, region: str) -> None:
    raw = bytearray(report("trustee-report-milan-v2.bin"))
    raw[offset] ^= 0x01
    verdict = snp.verify_report(bytes(raw), certs("trustee-vcek-milan.der"), now=VCEK_NOW)
    assert not verdict.valid, region
    assert verdict.failures == ["report signature does not verify with the VCEK"]


@pytest.mark.parametrize("offset", [0x2A0, 0x2E8])
def test_snp_flipped_byte_in_signature_is_refused(offset: int) -> None:
    raw = bytearray(report("virtee-report-milan-v2.hex"))
    raw[offset] ^= 0x80
    verdict = snp.verify_report(bytes(raw), certs("virtee-vcek-milan.der"), now=VCEK_NOW)
    assert verdict.failures == ["report signature does not verify with the VCEK"]


def test_snp_wrong_certificate_is_refused() -> None:
    # virtee's report with trustee's VCEK (same product line, another chip)
    verdict = snp.verify_report(
        report("virtee-report-milan-v2.hex"), certs("trustee-vcek-milan.der"), now=VCEK_NOW
    )
    assert verdict.failures == ["report signature does not verify with the VCEK"]
    # a VCEK report with only a VLEK at hand
    verdict = snp.verify_report(
        report("trustee-report-milan-v2.bin"), certs("trustee-vlek-milan.der")
    )
    assert verdict.failures[0].startswith("no VCEK certificate for this report")


def test_snp_wrong_product_chain_is_refused() -> None:
    genoa = certs("amd-genoa-ask-ark-asvk.pem")
    vcek = certs("trustee-vcek-milan.der").vcek[0]
    failures = snp.verify_key_chain(vcek, genoa, now=VCEK_NOW, roots=genoa.ark)
    assert failures and "ARK 'ARK-Milan' is not a trusted root" in failures[0]


def test_snp_expired_key_is_refused() -> None:
    verdict = snp.verify_report(
        report("trustee-report-milan-v3-vlek.bin"),
        certs("trustee-vlek-milan.der"),
        now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    assert verdict.failures == ["SEV-VLEK expired on 2025-12-10"]


def test_snp_truncated_report_is_bad_input() -> None:
    with pytest.raises(BadEvidence, match="1184 bytes, this one 1000"):
        snp.verify_report(
            report("trustee-report-milan-v2.bin")[:1000], certs("trustee-vcek-milan.der")
        )


def test_snp_tcb_mismatch_with_vcek_is_refused() -> None:
    # a report whose TCB differs from the VCEK's cannot come from it: the signature breaks first,
    # so check the comparison on the extensions directly
    vcek = certs("trustee-vcek-milan.der").vcek[0]
    assert snp.cert_tcb(vcek) == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert snp.cert_hwid(vcek) == report("trustee-report-milan-v2.bin")[0x1A0:0x1E0]


# --- TDX ---------------------------------------------------------------------------------


def collateral() -> str:
    return tdx.read_collateral(TDX / "dcapqvl-tdx-quote-v4.collateral.json")


def test_tdx_dcap_qvl_quote_verifies_at_readme_now() -> None:
    verdict = tdx.verify_quote(
        (TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes(), collateral(), now=TDX_NOW
    )
    assert verdict.valid, verdict.reason
    assert verdict.claims["tcb_status"] == "UpToDate"
    assert verdict.claims["mr_td"].startswith("91eb2b44d141d4ec")
    assert verdict.claims["debug"] is False


@pytest.mark.parametrize(
    ("name", "version", "debug"),
    [("trustee-tdx-quote-v4.bin", 4, True), ("trustee-tdx-quote-v5.bin", 5, False),
     ("dcapqvl-tdx-quote-v4.bin", 4, False)],
)  # fmt: skip
def test_tdx_quotes_parse_like_dcap_qvl(name: str, version: int, debug: bool) -> None:
    import dcap_qvl

    raw = (TDX / name).read_bytes()
    quote = tdx.parse_quote(raw)
    ref = dcap_qvl.parse_quote(raw).report
    assert quote.version == version
    assert quote.mr_td == ref.mr_td
    assert quote.rtmrs == (ref.rt_mr0, ref.rt_mr1, ref.rt_mr2, ref.rt_mr3)
    assert quote.report_data == ref.report_data
    assert quote.td_attributes.to_bytes(8, "little") == ref.td_attributes
    assert quote.debug is debug


def test_tdx_quote_without_collateral_is_parsed_not_verified() -> None:
    verdict = tdx.verify_quote((TDX / "trustee-tdx-quote-v5.bin").read_bytes(), None)
    assert verdict.verified == []
    assert verdict.failures == ["quote parsed but not verified: no collateral (give --collateral)"]
    debug = tdx.verify_quote((TDX / "trustee-tdx-quote-v4.bin").read_bytes(), None)
    assert debug.failures[0] == "TD attributes have DEBUG set: the TD's memory is not private"


@pytest.mark.parametrize(
    ("offset", "region"),
    [(2, "header"), (184, "MRTD"), (376, "RTMR0"), (600, "report data")],
)
def test_tdx_flipped_byte_is_refused(offset: int, region: str) -> None:
    raw = bytearray((TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes())
    raw[offset] ^= 0x01
    verdict = tdx.verify_quote(bytes(raw), collateral(), now=TDX_NOW)
    assert not verdict.valid, region
    assert verdict.failures[0].startswith("quote verification failed:"), verdict.failures


def test_tdx_after_crl_next_update_is_refused() -> None:
    data = json.loads(collateral())
    crl = x509.load_der_x509_crl(bytes.fromhex(data["root_ca_crl"]))
    late = int(crl.next_update_utc.timestamp()) + 1
    verdict = tdx.verify_quote(
        (TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes(), collateral(), now=late
    )
    assert not verdict.valid
    assert "CrlExpired" in verdict.reason


def test_tdx_wrong_collateral_is_refused() -> None:
    data = json.loads(collateral())
    data["tcb_info"] = data["tcb_info"].replace('"fmspc":"', '"fmspc":"0', 1)
    verdict = tdx.verify_quote(
        (TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes(), json.dumps(data), now=TDX_NOW
    )
    assert not verdict.valid


def test_tdx_truncated_quote_is_bad_input() -> None:
    with pytest.raises(BadEvidence, match="truncated"):
        tdx.verify_quote((TDX / "dcapqvl-tdx-quote-v4.bin").read_bytes()[:400], collateral())


def test_report_data_binding_is_trustees() -> None:
    # Trustee's attestation-service test: JCS + SHA-384 of {"b": 1, "a": "test", "c": {"d": "e"}}
    import hashlib

    from orchestrator.attest.common import canonical_json

    digest = hashlib.sha384(canonical_json({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest()
    assert digest.startswith("e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c")
    data = expected_report_data("n", {"kty": "EC"})
    assert len(data) == 64 and data[48:] == bytes(16)


# --- the CLI -----------------------------------------------------------------------------


def gcvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    ok = gcvm("attest", "verify", str(SNP / "virtee-report-milan-v2.hex"), "--certs", str(SNP))
    assert ok.returncode == 0, ok.stderr
    assert "verdict: valid" in ok.stdout and "chain VCEK -> SEV-Milan -> ARK-Milan" in ok.stdout
    quote = gcvm(
        "attest", "verify", str(TDX / "dcapqvl-tdx-quote-v4.bin"),
        "--collateral", str(TDX / "dcapqvl-tdx-quote-v4.collateral.json"), "--now", str(TDX_NOW),
        "--json",
    )  # fmt: skip
    assert quote.returncode == 0, quote.stderr
    assert json.loads(quote.stdout)["claims"]["tcb_status"] == "UpToDate"
    late = gcvm(
        "attest", "verify", str(TDX / "dcapqvl-tdx-quote-v4.bin"),
        "--collateral", str(TDX / "dcapqvl-tdx-quote-v4.collateral.json"), "--now", "1775215318",
    )  # fmt: skip
    assert late.returncode == 1 and "CrlExpired" in late.stderr
    short = tmp_path / "short.bin"
    short.write_bytes((SNP / "trustee-report-milan-v2.bin").read_bytes()[:700])
    bad = gcvm("attest", "verify", str(short), "--tee", "snp")
    assert bad.returncode == 2 and "1184 bytes" in bad.stderr
    nocerts = gcvm("attest", "verify", str(SNP / "trustee-report-milan-v2.bin"))
    assert nocerts.returncode == 2 and "give --certs" in nocerts.stderr
    parsed = gcvm("attest", "verify", str(TDX / "trustee-tdx-quote-v5.bin"))
    assert parsed.returncode == 1 and "parsed but not verified" in parsed.stderr
    assert "quote_version          5" in parsed.stdout
