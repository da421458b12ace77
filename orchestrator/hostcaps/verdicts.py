"""TEE verdicts: each requirement of TDX and SEV-SNP as a named check with a fix."""

from __future__ import annotations

from orchestrator.hostcaps.facts import Check, SnpCaps, TdxCaps
from orchestrator.hostcaps.versions import Version, fmt_version, parse_version
from orchestrator.spec import Tee

# Floors from the design note (confidential-vms.md): libvirt, QEMU, host kernel.
FLOORS: dict[Tee, dict[str, Version]] = {
    Tee.tdx: {"libvirt": (11, 6, 0), "qemu": (10, 1, 0), "kernel": (6, 16, 0)},
    Tee.sev_snp: {"libvirt": (10, 5, 0), "qemu": (9, 1, 0), "kernel": (6, 11, 0)},
}
# libvirt releases that report TDX on hosts without it.
TDX_FALSE_POSITIVE = ((11, 6, 0), (11, 9, 99))


def _floor_checks(tee: Tee, versions: dict[str, Version | None]) -> list[Check]:
    names = {"libvirt": "libvirt", "qemu": "QEMU", "kernel": "host kernel"}
    fixes = {
        "libvirt": "install a newer libvirt (distribution backports or a TDX/SNP-enabled build)",
        "qemu": "install a newer QEMU (distribution backports or a TDX/SNP-enabled build)",
        "kernel": "boot a newer host kernel with the vendor's TEE support",
    }
    checks = []
    for key, floor in FLOORS[tee].items():
        have = versions.get(key)
        label = f"{names[key]} >= {fmt_version(floor)}"
        if have is None:
            checks.append(Check(label, None, "version unknown", fixes[key]))
        else:
            checks.append(Check(label, have >= floor, f"found {fmt_version(have)}", fixes[key]))
    return checks


def tdx_caps(
    *,
    sectype: bool,
    sysfs_flag: bool | None,
    libvirt_version: Version | None,
    qemu_version: Version | None,
    kernel_release: str | None,
) -> TdxCaps:
    checks = [
        Check(
            "TDX launch security",
            sectype,
            "offered by libvirt/QEMU" if sectype else "not offered by libvirt/QEMU",
            "needs QEMU >= 10.1 and libvirt >= 11.6 built with TDX, on a TDX host",
        ),
        Check(
            "kvm_intel tdx=Y",
            sysfs_flag,
            {True: "enabled", False: "not enabled (or kvm_intel not loaded)", None: "not known"}[
                sysfs_flag
            ],
            "enable TDX in the BIOS, boot with kvm_intel.tdx=1 and check dmesg for "
            "'virt/tdx: module initialized'",
        ),
        *_floor_checks(
            Tee.tdx,
            {
                "libvirt": libvirt_version,
                "qemu": qemu_version,
                "kernel": parse_version(kernel_release),
            },
        ),
    ]
    if (
        sectype
        and sysfs_flag is None
        and libvirt_version is not None
        and TDX_FALSE_POSITIVE[0] <= libvirt_version <= TDX_FALSE_POSITIVE[1]
    ):
        checks.append(
            Check(
                "TDX report trustworthy",
                None,
                f"libvirt {fmt_version(libvirt_version)} reports TDX on hosts without it",
                "confirm /sys/module/kvm_intel/parameters/tdx = Y on that host",
            )
        )
    return TdxCaps(supported=all(c.ok is not False for c in checks), checks=tuple(checks))


def snp_caps(
    *,
    sectype: bool,
    sysfs_flag: bool | None,
    cbitpos: int | None,
    reduced_phys_bits: int | None,
    libvirt_version: Version | None,
    qemu_version: Version | None,
    kernel_release: str | None,
) -> SnpCaps:
    have_bits = cbitpos is not None and reduced_phys_bits is not None
    checks = [
        Check(
            "SEV-SNP launch security",
            sectype,
            "offered by libvirt/QEMU" if sectype else "not offered by libvirt/QEMU",
            "needs QEMU >= 9.1 and libvirt >= 10.5 on an SNP-enabled AMD EPYC host",
        ),
        Check(
            "kvm_amd sev_snp=Y",
            sysfs_flag,
            {True: "enabled", False: "not enabled (or kvm_amd not loaded)", None: "not known"}[
                sysfs_flag
            ],
            "enable SEV-SNP in the BIOS (SNP firmware >= 1.51) and load kvm_amd with sev_snp=1",
        ),
        Check(
            "SEV cbitpos/reducedPhysBits",
            have_bits if sectype else None,
            f"cbitpos {cbitpos}, reducedPhysBits {reduced_phys_bits}"
            if have_bits
            else "not reported",
            "libvirt reports them in domcapabilities features/sev on an SEV host",
        ),
        *_floor_checks(
            Tee.sev_snp,
            {
                "libvirt": libvirt_version,
                "qemu": qemu_version,
                "kernel": parse_version(kernel_release),
            },
        ),
    ]
    return SnpCaps(
        supported=all(c.ok is not False for c in checks) and sectype,
        cbitpos=cbitpos,
        reduced_phys_bits=reduced_phys_bits,
        checks=tuple(checks),
    )
