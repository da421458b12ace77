"""Host capabilities: domcapabilities of a TDX host, an SNP host and this plain host, sysfs flags,
firmware descriptors, the KVM probe (real QEMU) and the live host through libvirt's embedded
QEMU driver (no daemon)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import hostcaps, render
from orchestrator.hostcaps import Firmware, HostCaps, Sysfs
from orchestrator.spec import Tee

FIXTURES = Path(__file__).parent / "fixtures"
PLAIN = FIXTURES / "domcaps-plain-debian12.xml"  # captured on this project's Debian 12 host
TDX = render.BUILTIN_HOSTS_DIR / "tdx-host.domcaps.xml"
SNP = render.BUILTIN_HOSTS_DIR / "sev-snp-host.domcaps.xml"
REPO = Path(__file__).resolve().parents[2]


def _failed(checks: tuple[hostcaps.Check, ...]) -> set[str]:
    return {c.name for c in checks if c.ok is False}


def test_tdx_host_fixture() -> None:
    caps = HostCaps.from_domcaps_xml(
        TDX.read_text(),
        libvirt_version=(11, 10, 0),
        kernel_release="6.17.0",
        sysfs=Sysfs(known=(("kvm_intel", "tdx"),)),
    )
    assert caps.tdx.supported and not caps.tdx.reasons
    assert not caps.snp.supported
    assert caps.qemu_version == (10, 1, 0)  # from machine pc-q35-10.1
    assert caps.firmware.tdx == Path("/usr/share/edk2/ovmf/OVMF.inteltdx.fd")
    assert caps.kvm_present and caps.kvm_usable
    assert caps.emulator == "/usr/bin/qemu-system-x86_64"


def test_tdx_needs_the_kernel_flag_too() -> None:
    """libvirt 11.6-11.9 report TDX on hosts without it: the sysfs flag decides."""
    caps = HostCaps.from_domcaps_xml(
        TDX.read_text(), libvirt_version=(11, 6, 0), kernel_release="6.17.0", sysfs=Sysfs(known=())
    )
    assert not caps.tdx.supported
    assert "kvm_intel tdx=Y" in _failed(caps.tdx.checks)
    unknown = HostCaps.from_domcaps_xml(TDX.read_text(), libvirt_version=(11, 6, 0))
    flagged = {c.name: c for c in unknown.tdx.checks}
    assert flagged["TDX report trustworthy"].ok is None
    assert "reports TDX on hosts without it" in flagged["TDX report trustworthy"].detail


def test_snp_host_fixture() -> None:
    caps = HostCaps.from_domcaps_xml(
        SNP.read_text(),
        libvirt_version=(10, 10, 0),
        kernel_release="6.12.0",
        sysfs=Sysfs(known=(("kvm_amd", "sev_snp"),)),
    )
    assert caps.snp.supported, caps.snp.reasons
    assert (caps.snp.cbitpos, caps.snp.reduced_phys_bits) == (51, 1)
    assert not caps.tdx.supported
    assert caps.firmware.sev_snp == Path("/usr/share/edk2/ovmf/OVMF.amdsev.fd")


def test_snp_version_floors_fail_by_name() -> None:
    caps = HostCaps.from_domcaps_xml(
        SNP.read_text(),
        libvirt_version=(10, 0, 0),
        qemu_version=(8, 2, 0),
        kernel_release="6.8.0-45-generic",
        sysfs=Sysfs(known=(("kvm_amd", "sev_snp"),)),
    )
    assert not caps.snp.supported
    assert _failed(caps.snp.checks) == {
        "libvirt >= 10.5.0",
        "QEMU >= 9.1.0",
        "host kernel >= 6.11.0",
    }


def test_plain_host_capture() -> None:
    caps = HostCaps.from_domcaps_xml(
        PLAIN.read_text(),
        libvirt_version=(9, 0, 0),
        kernel_release=os.uname().release,
        sysfs=Sysfs(known=()),
    )
    assert not caps.tdx.supported and not caps.snp.supported
    assert "TDX launch security" in _failed(caps.tdx.checks)
    assert "SEV-SNP launch security" in _failed(caps.snp.checks)
    assert caps.snp.cbitpos is None
    assert caps.qemu_version == (7, 2, 0)
    assert caps.firmware == Firmware()  # no TDX/SNP build among its loaders


def test_from_file_rejects_other_documents(tmp_path: Path) -> None:
    bad = tmp_path / "caps.xml"
    bad.write_text("<capabilities/>")
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match="not a libvirt domcapabilities"):
        HostCaps.from_file(bad)


def test_sysfs_flags_from_a_tree(tmp_path: Path) -> None:
    params = tmp_path / "sys/module/kvm_intel/parameters"
    params.mkdir(parents=True)
    (params / "tdx").write_text("Y\n")
    sysfs = Sysfs(tmp_path)
    assert sysfs.flag("kvm_intel", "tdx") is True
    (params / "tdx").write_text("N\n")
    assert sysfs.flag("kvm_intel", "tdx") is False
    assert sysfs.flag("kvm_amd", "sev_snp") is None


def _descriptor(
    folder: Path, name: str, features: list[str], image: str, device: str = "memory"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, object] = (
        {"device": "memory", "filename": image}
        if device == "memory"
        else {"device": "flash", "executable": {"filename": image, "format": "raw"}}
    )
    (folder / name).write_text(
        json.dumps(
            {
                "interface-types": ["uefi"],
                "mapping": mapping,
                "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
                "features": features,
            }
        )
    )


def test_firmware_descriptors(tmp_path: Path) -> None:
    etc, share = tmp_path / "etc", tmp_path / "share"
    _descriptor(share, "30-tdx.json", ["intel-tdx", "verbose-static"], "/fw/OVMF.inteltdx.fd")
    _descriptor(share, "40-snp.json", ["amd-sev", "amd-sev-es", "amd-sev-snp"], "/fw/amdsev.fd")
    _descriptor(share, "60-efi.json", ["acpi-s3"], "/fw/CODE.fd", device="flash")
    _descriptor(etc, "40-snp.json", ["amd-sev-snp"], "/etc-fw/amdsev.fd")  # overrides by name
    found = hostcaps.find_firmware(hostcaps.firmware_descriptors((etc, share)))
    assert found == Firmware(
        tdx=Path("/fw/OVMF.inteltdx.fd"), sev_snp=Path("/etc-fw/amdsev.fd"), efi=Path("/fw/CODE.fd")
    )
    (etc / "30-tdx.json").write_text("")  # an empty file disables the descriptor
    assert hostcaps.find_firmware(hostcaps.firmware_descriptors((etc, share))).tdx is None


def test_this_hosts_firmware_descriptors() -> None:
    if not Path("/usr/share/qemu/firmware").is_dir():
        pytest.skip("no QEMU firmware descriptors installed")
    found = hostcaps.find_firmware(hostcaps.firmware_descriptors())
    assert found.efi is not None and found.efi.exists()


def test_probe_image_is_the_assembled_source(tmp_path: Path) -> None:
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("binutils (as, objcopy) not installed")
    obj, binary = tmp_path / "probe.o", tmp_path / "probe.bin"
    subprocess.run(
        ["as", "--32", "-o", str(obj), str(REPO / "orchestrator/kvmprobe.S")], check=True
    )
    subprocess.run(["objcopy", "-O", "binary", str(obj), str(binary)], check=True)
    assert binary.read_bytes() == hostcaps.probe_image()


@pytest.fixture
def qemu() -> str:
    path = shutil.which(hostcaps.QEMU_BINARY)
    if path is None:
        pytest.skip("qemu-system-x86_64 not installed")
    return path


def test_probe_guest_reaches_long_mode_under_tcg(qemu: str) -> None:
    result = hostcaps.run_probe_guest(qemu, "tcg", timeout=10)
    assert result.usable, result.reason
    assert "long mode" in result.reason


def test_kvm_probe_is_time_limited_and_cached(
    qemu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm device node")
    monkeypatch.setenv("GCVM_CACHE", str(tmp_path))
    first = hostcaps.kvm_probe(qemu, timeout=3)
    assert first.seconds is not None and first.seconds < 3 + 2
    assert not first.cached
    if not first.usable:
        assert "did not finish within 3 s" in first.reason or "exited" in first.reason
    second = hostcaps.kvm_probe(qemu, timeout=3)
    assert second.cached and (second.usable, second.reason) == (first.usable, first.reason)
    entries = json.loads((tmp_path / "hostcaps/kvm-probe.json").read_text())
    version = hostcaps.fmt_version(hostcaps.qemu_binary_version(qemu))
    assert list(entries) == [f"{os.uname().release} qemu-{version}"]
    hostcaps.forget_kvm_probe()
    assert hostcaps.cached_kvm_probe(hostcaps.qemu_binary_version(qemu)) is None


def test_fix_kvm_permissions(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    import grp

    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        pytest.skip("no kvm group")
    node = tmp_path / "kvm"
    node.write_text("")
    os.chmod(node, 0o600)
    change = hostcaps.fix_kvm_permissions(node)
    assert change is not None and "0o600" in change
    assert node.stat().st_gid == kvm_gid and node.stat().st_mode & 0o777 == 0o660
    assert hostcaps.fix_kvm_permissions(node) is None  # nothing left to do


def test_probe_qemu_on_this_host(
    qemu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GCVM_CACHE", str(tmp_path))
    caps = hostcaps.probe_qemu(kvm_probe=False)
    assert caps.tcg_available
    assert caps.qemu_version == hostcaps.qemu_binary_version(qemu)
    assert "q35" in caps.machines or any(m.startswith("pc-q35") for m in caps.machines)
    assert hostcaps.NO_DAEMON_NOTE in caps.notes
    objects = subprocess.run([qemu, "-object", "help"], capture_output=True, text=True).stdout
    offered = {c.name: c.ok for c in caps.tdx.checks}["TDX launch security"]
    assert offered == ("tdx-guest" in objects.split())
    if caps.qemu_version is not None and caps.qemu_version < (9, 1, 0):
        assert not caps.tdx.supported and not caps.snp.supported


@pytest.mark.slow
def test_probe_through_libvirt_embedded_driver(
    qemu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live host through libvirt-python without a daemon (qemu:///embed)."""
    libvirt = pytest.importorskip("libvirt")
    monkeypatch.setenv("GCVM_CACHE", str(tmp_path / "cache"))
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(f"qemu:///embed?root={tmp_path / 'embed'}")
    try:
        caps = hostcaps.probe(conn, kvm_probe=False)
    finally:
        conn.close()
    assert caps.libvirt_daemon
    assert caps.libvirt_version == hostcaps.libvirt_number_to_version(libvirt.getVersion())
    assert caps.qemu_version == hostcaps.qemu_binary_version(qemu)
    assert caps.domcaps_xml and "<domainCapabilities>" in caps.domcaps_xml
    assert caps.tcg_available
    reparsed = HostCaps.from_domcaps_xml(caps.domcaps_xml)
    assert reparsed.tdx.checks[0] == caps.tdx.checks[0]
    assert (reparsed.snp.cbitpos, reparsed.snp.reduced_phys_bits) == (
        caps.snp.cbitpos,
        caps.snp.reduced_phys_bits,
    )


def test_supports_dispatch() -> None:
    caps = render.BUILTIN_HOSTS[Tee.tdx].caps()
    assert caps.supports(Tee.none) and caps.supports(Tee.tdx) and not caps.supports(Tee.sev_snp)
