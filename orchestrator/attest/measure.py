"""Reference values: the SEV-SNP launch digest a guest must report, computed offline.

`sev-snp-measure` (PyPI) replays what the AMD secure processor measures at launch: the OVMF image
(an SNP build, e.g. Debian's `ovmf-amdsev` `OVMF.amdsev.fd`), the kernel, initrd and command line
of a measured direct boot (their SHA-256 in OVMF's hash table), and one VMSA per vCPU (vCPU count
and type, guest features). Any byte of these changes the 48-byte digest. TDX has no such tool:
its MRTD/RTMRs are pinned from a known-good launch.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import UsageError

# SEV_FEATURES of the VMSA: SNPActive (bit 0); kernels >= 6.6 also ask for DebugSwap (bit 5)
DEFAULT_GUEST_FEATURES = 0x1


def snp_launch_digest(
    ovmf: Path,
    kernel: Path,
    initrd: Path | None,
    append: str,
    *,
    vcpus: int = 1,
    vcpu_type: str = "EPYC-v4",
    guest_features: int = DEFAULT_GUEST_FEATURES,
    hint: str = "the firmware must be an SEV-SNP OVMF build (OVMF.amdsev.fd)",
) -> bytes:
    from sevsnpmeasure import guest, sev_mode, vcpu_types

    if vcpu_type not in vcpu_types.CPU_SIGS:
        raise UsageError(
            f"unknown vCPU type {vcpu_type!r}", hint=", ".join(sorted(vcpu_types.CPU_SIGS))
        )
    if vcpus < 1:
        raise UsageError("vcpus must be >= 1")
    for path in (ovmf, kernel, initrd):
        if path is not None and not path.is_file():
            raise UsageError(f"{path} is not a file")
    try:
        digest = guest.calc_launch_digest(
            sev_mode.SevMode.SEV_SNP,
            vcpus,
            vcpu_types.CPU_SIGS[vcpu_type],
            str(ovmf),
            str(kernel),
            str(initrd) if initrd else None,
            append,
            guest_features,
        )
    except Exception as exc:  # sev-snp-measure parses the firmware with asserts, struct, ...
        reason = str(exc) or type(exc).__name__
        if "SNP_KERNEL_HASHES" in reason:
            reason = f"it has no kernel-hashes table for a measured direct boot ({reason})"
        raise UsageError(f"cannot measure with {ovmf}: {reason}", hint=hint) from None
    return bytes(digest)
