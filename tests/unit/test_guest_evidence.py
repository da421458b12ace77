"""The guest's evidence sources (groupcover.keyrelease.evidence): configfs-tsm driven through a
temporary folder laid out as the kernel's ABI document describes it (FakeTsm: real files, the
kernel's own doings simulated), /dev/sev-guest up to the ioctl call with a fake ioctl, the SNP
certificate table against AMD's real certificates, and `detect`'s one-line refusals."""

from __future__ import annotations

import base64
import ctypes
import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from groupcover.keyrelease import evidence as ev
from orchestrator.attest.snp import SnpCerts
from tests.unit.attest_testchain import FakeTsm, SnpTestChain

ROOT = Path(__file__).resolve().parents[2]
SNP = ROOT / "tests" / "fixtures" / "attestation" / "snp"


def _snp(tmp_path: Path, **kw) -> tuple[FakeTsm, SnpTestChain]:
    chain = SnpTestChain.make()
    fake = FakeTsm(tmp_path / "tsm", "sev_guest", chain.report, chain.cert_table(), **kw)
    return fake, chain


# --- the certificate table ----------------------------------------------------------------


def test_cert_table_of_amds_real_certificates() -> None:
    """VCEK, ASK and ARK of a real Milan chain (virtee/sev's vectors) through the table the host
    gives: the guest's parser and the broker's reader see the same certificates."""
    vcek = (SNP / "virtee-vcek-milan.der").read_bytes()
    ask, ark = x509.load_pem_x509_certificates((SNP / "virtee-cert-chain-milan.pem").read_bytes())
    certs = [("vcek", vcek), ("ask", ask.public_bytes(Encoding.DER)),
             ("ark", ark.public_bytes(Encoding.DER))]  # fmt: skip
    table = ev.build_cert_table(certs)
    parsed = ev.parse_cert_table(table)
    assert [(e["cert_type"], base64.b64decode(e["data"])) for e in parsed] == certs
    broker = SnpCerts.from_table((e["cert_type"], base64.b64decode(e["data"])) for e in parsed)
    assert [c.subject.rfc4514_string() for c in broker.ask + broker.ark] == [
        ask.subject.rfc4514_string(),
        ark.subject.rfc4514_string(),
    ]
    assert broker.vcek[0].public_bytes(Encoding.DER) == vcek
    # the GUIDs as the GHCB specification lists them (little-endian on the wire)
    assert table[:16] == bytes.fromhex("8d75da6364e66445adc5f4b93be8accd")
    with pytest.raises(ev.EvidenceError, match="truncated"):
        ev.parse_cert_table(table[:-2])


# --- configfs-tsm -------------------------------------------------------------------------


def test_snp_report_with_its_cert_table(tmp_path: Path) -> None:
    fake, _ = _snp(tmp_path)
    source = ev.ConfigfsTsm(fake.root, fake, tee="snp")
    evidence = source.collect(b"\x42" * 64)
    report = base64.b64decode(evidence["attestation_report"])
    assert len(report) == 1184 and report[0x50:0x90] == b"\x42" * 64
    assert [c["cert_type"] for c in evidence["cert_chain"]] == ["vcek", "ask", "ark"]
    assert source.provider == "sev_guest"
    assert fake.entries == [] and len(fake.removed) == 1  # the entry is removed afterwards


def test_tdx_quote(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "tsm", "tdx_guest", lambda inblob: b"QUOTE" + inblob)
    evidence = ev.ConfigfsTsm(fake.root, fake, tee="tdx").collect(bytes(range(64)))
    assert base64.b64decode(evidence["quote"]) == b"QUOTE" + bytes(range(64))
    assert fake.entries == []


def test_privlevel_written_only_when_needed(tmp_path: Path) -> None:
    written = []

    class Recording(FakeTsm):
        def write(self, path: Path, data: bytes) -> None:
            written.append((path.name, data))
            super().write(path, data)

    chain = SnpTestChain.make()
    fake = Recording(tmp_path / "a", "sev_guest", chain.report)
    ev.ConfigfsTsm(fake.root, fake, tee="snp").collect(bytes(64))
    assert written == [("inblob", bytes(64))]  # VMPL 0 is the default: nothing to write
    written.clear()
    under_svsm = Recording(tmp_path / "b", "sev_guest", chain.report, floor=2)
    evidence = ev.ConfigfsTsm(under_svsm.root, under_svsm, tee="snp").collect(bytes(64))
    assert written == [("privlevel", b"2"), ("inblob", bytes(64))]
    assert "cert_chain" not in evidence  # an empty auxblob: the broker uses its own certs
    with pytest.raises(ev.EvidenceError, match=r"VMPL 1 is outside 2\.\.3"):
        ev.ConfigfsTsm(under_svsm.root, under_svsm, tee="snp", vmpl=1).collect(bytes(64))
    tdx = FakeTsm(tmp_path / "c", "tdx_guest", lambda b: b)
    with pytest.raises(ev.EvidenceError, match="no privlevel"):
        ev.ConfigfsTsm(tdx.root, tdx, tee="tdx", vmpl=1).collect(bytes(64))


def test_generation_race_is_retried_then_refused(tmp_path: Path) -> None:
    """Another writer bumps `generation` between the reads: the report is made again; a writer
    that does it every time gets the report refused after `tries`."""

    class Racy(FakeTsm):
        races = 0

        def read(self, path: Path) -> bytes:
            if path.name == "outblob" and self.races:
                self.races -= 1
                self.write(path.parent / "inblob", b"\xee" * 64)  # someone else's inblob
                data = super().read(path)
                self.write(path.parent / "inblob", b"\xee" * 64)
                return data
            return super().read(path)

    chain = SnpTestChain.make()
    fake = Racy(tmp_path / "tsm", "sev_guest", chain.report)
    fake.races = 2
    evidence = ev.ConfigfsTsm(fake.root, fake, tee="snp").collect(b"\x01" * 64)
    report = base64.b64decode(evidence["attestation_report"])
    assert report[0x50:0x90] == b"\x01" * 64 and fake.races == 0
    fake.races = 10
    with pytest.raises(ev.EvidenceError, match=r"another writer changed .* 3 tries"):
        ev.ConfigfsTsm(fake.root, fake, tee="snp").collect(b"\x01" * 64)
    assert fake.entries == []


def test_a_vanishing_provider(tmp_path: Path) -> None:
    """The entry goes away mid-way (the provider's module unloaded): one line, no traceback."""

    class Vanishing(FakeTsm):
        def read(self, path: Path) -> bytes:
            if path.name == "outblob":
                self.rmdir(path.parent)
            return super().read(path)

    fake = Vanishing(tmp_path / "tsm", "tdx_guest", lambda b: b)
    with pytest.raises(ev.EvidenceError, match=r"the evidence provider went away .*outblob"):
        ev.ConfigfsTsm(fake.root, fake, tee="tdx").collect(bytes(64))


def test_a_provider_of_the_other_tee_is_refused(tmp_path: Path) -> None:
    fake, _ = _snp(tmp_path)
    with pytest.raises(ev.EvidenceError, match="'sev_guest', not 'tdx_guest'"):
        ev.ConfigfsTsm(fake.root, fake, tee="tdx").collect(bytes(64))
    odd = FakeTsm(tmp_path / "odd", "arm_cca_guest", lambda b: b)
    with pytest.raises(ev.EvidenceError, match="'arm_cca_guest', not 'sev_guest'"):
        ev.ConfigfsTsm(odd.root, odd, tee="snp").collect(bytes(64))
    assert fake.entries == [] and odd.entries == []
    with pytest.raises(ev.EvidenceError, match="tdx or snp"):
        ev.ConfigfsTsm(fake.root, fake, tee="sample")


def test_oversized_inblob(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "tsm", "tdx_guest", lambda b: b)
    source = ev.ConfigfsTsm(fake.root, fake, tee="tdx")
    for size in (65, 63):
        with pytest.raises(ev.EvidenceError, match=f"must be 64 bytes .*not {size}"):
            source.collect(bytes(size))
    with pytest.raises(OSError) as kernel:  # what the kernel itself says to 65 bytes
        fake.mkdir(fake.root / "x")
        source.fs.write(fake.root / "x" / "inblob", bytes(65))
    assert kernel.value.errno == errno.EINVAL


def test_mkdir_enxio_means_no_provider(tmp_path: Path) -> None:
    class NoProvider(FakeTsm):
        def mkdir(self, path: Path) -> None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))

    fake = NoProvider(tmp_path / "tsm", "", lambda b: b)
    with pytest.raises(ev.NoEvidenceProvider, match=r"^no TEE evidence provider \(.*ENXIO"):
        ev.ConfigfsTsm(fake.root, fake, tee="tdx").collect(bytes(64))


# --- /dev/sev-guest -----------------------------------------------------------------------


def test_sev_guest_extended_report_up_to_the_ioctl(tmp_path: Path) -> None:
    chain = SnpTestChain.make()
    table = chain.cert_table()
    calls = []

    def ioctl(fd: int, request: int, arg: bytearray) -> int:
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", arg)
        user_data = ctypes.string_at(req_addr, 64)
        vmpl = struct.unpack("<I", ctypes.string_at(req_addr + 64, 4))[0]
        certs_addr, certs_len = struct.unpack("<QI", ctypes.string_at(req_addr + 96, 12))
        calls.append((request, version, vmpl, certs_len))
        if certs_len < 5 * 4096:  # the host's table needs more: EINVAL, vmm_error 1, the size
            ctypes.memmove(req_addr + 104, struct.pack("<I", 5 * 4096), 4)
            struct.pack_into("<II", arg, 24, 0, 1)
            raise OSError(errno.EINVAL, "Invalid argument")
        ctypes.memmove(certs_addr, table, len(table))
        body = struct.pack("<II", 0, 1184) + bytes(24) + chain.report(user_data)
        ctypes.memmove(resp_addr, body, len(body))
        return 0

    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    evidence = ev.SevGuestDevice(device, ioctl=ioctl).collect(b"\x07" * 64)
    assert base64.b64decode(evidence["attestation_report"])[0x50:0x90] == b"\x07" * 64
    assert [c["cert_type"] for c in evidence["cert_chain"]] == ["vcek", "ask", "ark"]
    assert calls == [(0xC0205302, 1, 0, 4 * 4096), (0xC0205302, 1, 0, 5 * 4096)]

    def plain(fd: int, request: int, arg: bytearray) -> int:
        _, _, resp_addr, _ = struct.unpack("<B7xQQQ", arg)
        calls.append(request)
        body = struct.pack("<II", 0, 1184) + bytes(24) + chain.report(bytes(64))
        ctypes.memmove(resp_addr, body, len(body))
        return 0

    evidence = ev.SevGuestDevice(device, ioctl=plain, extended=False).collect(bytes(64))
    assert calls[-1] == 0xC0205300 and "cert_chain" not in evidence

    def failing(fd: int, request: int, arg: bytearray) -> int:
        struct.pack_into("<II", arg, 24, 0x16, 0)
        raise OSError(5, "Input/output error")

    with pytest.raises(ev.EvidenceError, match="SNP_GET_EXT_REPORT failed: Input/output error"):
        ev.SevGuestDevice(device, ioctl=failing).collect(bytes(64))


# --- detect: which source, or one line saying why none -------------------------------------


def test_detect(tmp_path: Path) -> None:
    assert isinstance(ev.detect("none"), ev.NoEvidence)
    config = tmp_path / "config"
    root = config / "tsm" / "report"
    dev = tmp_path / "sev-guest"
    with pytest.raises(ev.NoEvidenceProvider, match=r"configfs is not mounted"):
        ev.detect("tdx", root, dev)
    (config / "pci_ep").mkdir(parents=True)
    with pytest.raises(ev.NoEvidenceProvider, match=r"no configfs-tsm .* tsm module"):
        ev.detect("tdx", root, dev)
    with pytest.raises(ev.NoEvidenceProvider, match=r"sev-guest is absent\)$"):
        ev.detect("snp", root, dev)
    dev.write_bytes(b"")
    assert isinstance(ev.detect("snp", root, dev), ev.SevGuestDevice)

    # `modprobe tsm` in a plain VM: the folder is there, but mkdir fails with ENXIO
    class NoProvider(FakeTsm):
        def mkdir(self, path: Path) -> None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))

    none = NoProvider(root, "", lambda b: b)
    assert isinstance(ev.detect("snp", root, dev, none), ev.SevGuestDevice)
    with pytest.raises(ev.NoEvidenceProvider, match=r"has no provider: mkdir .* ENXIO"):
        ev.detect("tdx", root, dev, none)
    sev = FakeTsm(root, "sev_guest", lambda b: b)
    assert isinstance(ev.detect("sev-snp", root, dev, sev), ev.ConfigfsTsm)
    with pytest.raises(ev.EvidenceError, match="'sev_guest', not 'tdx_guest'"):
        ev.detect("tdx", root, dev, sev)  # refused before the broker is asked
    assert sev.entries == []


def test_no_provider_is_one_line_without_traceback(tmp_path: Path) -> None:
    """The master's own path: `groupcover keyrelease --tee tdx` in a guest without a provider."""
    code = (
        "import sys; from pathlib import Path; from groupcover.keyrelease import evidence as ev; "
        f"ev.TSM_ROOT = Path({str(tmp_path / 'config/tsm/report')!r}); "
        "from groupcover.keyrelease.cli import main; "
        "sys.exit(main(['--broker', 'https://127.0.0.1:1', '--tee', 'tdx']))"
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: no TEE evidence provider (configfs is not mounted at {tmp_path / 'config'})"
    ], done.stderr
