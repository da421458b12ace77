"""`gcvm doctor`'s guest side: the image kernel's TEE guest support and the cached TEE firmware,
one line each with what to do."""

from __future__ import annotations

from pathlib import Path

from orchestrator import doctor, doctor_guest
from orchestrator.attest.firmware import Firmware
from orchestrator.ui import out

DEBIAN_6_1 = "CONFIG_AMD_MEM_ENCRYPT=y\nCONFIG_SEV_GUEST=m\n# CONFIG_INTEL_TDX_GUEST is not set\n"
DEBIAN_6_12 = (
    "CONFIG_INTEL_TDX_GUEST=y\nCONFIG_TDX_GUEST_DRIVER=m\nCONFIG_AMD_MEM_ENCRYPT=y\n"
    "CONFIG_SEV_GUEST=m\nCONFIG_TSM_REPORTS=m\n"
)


def test_bookworms_6_1_kernel() -> None:
    rows = {c.name: c for c in doctor_guest.kernel_checks(DEBIAN_6_1, "kernel.config")}
    tdx = rows["image kernel: TDX guest"]
    assert tdx.ok is False and "INTEL_TDX_GUEST, TDX_GUEST_DRIVER not set" in tdx.detail
    assert "6.12" in tdx.fix
    assert rows["image kernel: SEV-SNP guest"].ok is True
    assert rows["image kernel: SEV-SNP guest"].fix == ""
    tsm = rows["image kernel: configfs-tsm"]
    assert tsm.ok is False and "/dev/sev-guest" in tsm.fix


def test_backports_6_12_kernel() -> None:
    assert all(c.ok for c in doctor_guest.kernel_checks(DEBIAN_6_12, "kernel.config"))


def test_unknown_kernel_is_a_question_mark_not_a_failure() -> None:
    rows = doctor_guest.kernel_checks(None, "unknown: no guest image")
    assert [c.ok for c in rows] == [None] * 3 and rows[0].detail == "unknown: no guest image"


def test_firmware_cached_or_how_to_fetch_it(tmp_path: Path) -> None:
    snp = Firmware(tmp_path / "OVMF.amdsev.fd", "ovmf-amdsev", "2025.11-1", "d" * 64, "f" * 64)
    rows = doctor_guest.firmware_checks(lambda tee: snp if tee == "sev-snp" else None)
    assert [(c.ok, c.fix) for c in rows] == [
        (False, "gcvm attest firmware --tee tdx"),
        (True, ""),
    ]
    assert "ovmf-amdsev 2025.11-1" in rows[1].detail


def test_each_fact_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(doctor_guest, "image_kernel_config", lambda: (DEBIAN_6_1, "k.config"))
    monkeypatch.setattr("orchestrator.attest.firmware.cached_firmware", lambda tee: None)
    checks = doctor_guest.guest_checks()
    assert len(checks) == 5
    with out.capture() as captured:
        out.print(doctor.facts_table(checks, "gcvm doctor: guest side"))
    text = captured.get()
    for check in checks:
        assert sum(check.name in line for line in text.splitlines()) == 1
