"""Reference SEV-SNP measurements with sev-snp-measure, on Debian unstable's SNP OVMF (fetched and
cached; skipped when no package mirror can be reached)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.attest.measure import snp_launch_digest
from orchestrator.errors import UsageError
from tests.unit.attest_firmware import firmware_or_skip


@pytest.fixture(scope="module")
def ovmf() -> Path:
    return firmware_or_skip("sev-snp")


@pytest.fixture
def boot(tmp_path: Path) -> tuple[Path, Path]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x4d\x5a" + bytes(65534))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd" * 100)
    return kernel, initrd


def test_launch_digest_is_48_bytes_and_moves_with_every_input(ovmf: Path, boot) -> None:
    kernel, initrd = boot
    base = snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0")
    assert len(base) == 48
    assert snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0") == base
    assert snp_launch_digest(ovmf, kernel, initrd, "console=ttyS1") != base
    assert snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0", vcpus=2) != base
    assert snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0", guest_features=0x21) != base
    initrd.write_bytes(b"other")
    assert snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0") != base


def test_measure_command_matches_the_library(ovmf: Path, boot) -> None:
    kernel, initrd = boot
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "attest", "measure", "--ovmf", str(ovmf),
         "--kernel", str(kernel), "--initrd", str(initrd), "--append", "console=ttyS0 quiet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = snp_launch_digest(ovmf, kernel, initrd, "console=ttyS0 quiet")
    assert done.stdout.strip() == expected.hex()


def test_not_an_snp_firmware(tmp_path: Path, boot) -> None:
    kernel, initrd = boot
    with pytest.raises(UsageError, match="cannot measure"):
        snp_launch_digest(kernel, kernel, initrd, "")
    with pytest.raises(UsageError, match="unknown vCPU type"):
        snp_launch_digest(kernel, kernel, initrd, "", vcpu_type="Pentium")
