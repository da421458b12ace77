"""Reference values for a broker policy, computed on the owner's machine from what it built.

`gcvm attest policy` reads an image folder (kernel, initrd, command line and the SHA-256 the build
recorded for each file), composes the exact kernel command line the VM boots with
(`guest_cmdline`: the image's, then the pins the orchestrator appends), and computes the SEV-SNP
launch digest with sev-snp-measure against an SNP OVMF with the kernel-hashes table. The written
policy pins every claim it can: the measurement, debug off, VMPL, the guest policy bits (SMT,
migration agent, single socket, ABI minimum), a minimum TCB when given; for TDX the TD attributes.
TDX's MRTD is a function of the TDVF image only, but no calculator was checked here against a
public vector: it is pinned from a known-good launch (`--mrtd`, or later in the file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.attest.measure import DEFAULT_GUEST_FEATURES, snp_launch_digest
from orchestrator.attest.policy import _TCB_KEYS, parse_policy
from orchestrator.attest.snp import (
    POLICY_DEBUG,
    POLICY_MIGRATE_MA,
    POLICY_SINGLE_SOCKET,
    POLICY_SMT,
)
from orchestrator.digests import file_sha256
from orchestrator.errors import UsageError
from orchestrator.image.lookup import image_at
from orchestrator.image.model import INITRD, KERNEL, Image, guest_cmdline
from orchestrator.tee.base import TeeOptions

SNP_FIRMWARE_HINT = (
    "use OVMF.amdsev.fd from Debian's ovmf-amdsev (the SEV-SNP build with the kernel-hashes "
    "table): 'gcvm attest firmware --tee sev-snp' downloads it and prints its path"
)
REBUILD_HINT = "rebuild the image: sudo gcvm image build --force"
TDX_MRTD_NOTE = (
    "MRTD and RTMRs are not computed here (no calculator checked against a public vector): "
    "launch the TD once on a host you trust, run 'gcvm attest verify QUOTE --collateral ...', "
    "and pin its mr_td (--mrtd, or tdx.mrtd in the file) and rtmr_0..2 (tdx.rtmrs)"
)


@dataclass
class Reference:
    """What `gcvm attest policy` computed: the policy document and how it came about."""

    policy: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # written as the file's header
    notes: list[str] = field(default_factory=list)  # printed as warnings
    seconds: float = 0.0


def checked_image(folder: Path) -> Image:
    """The image in `folder`, its kernel and initrd present and as its build recorded them."""
    image = image_at(folder)
    if image.kernel is None or image.initrd is None:
        raise UsageError(f"the image in {folder} has no kernel for a measured direct boot")
    for name, path in ((KERNEL, image.kernel), (INITRD, image.initrd)):
        if not path.is_file():
            raise UsageError(f"the image in {folder} lacks {path.name}", hint=REBUILD_HINT)
        recorded = image.files_sha256.get(name)
        if not recorded:
            raise UsageError(
                f"the image in {folder} records no SHA-256 of {name} (built before the build "
                "recorded them): its files cannot be vouched for",
                hint=REBUILD_HINT,
            )
        actual = file_sha256(path)
        if actual != recorded:
            raise UsageError(
                f"{path} has SHA-256 {actual[:16]}..., the image's build recorded "
                f"{recorded[:16]}...: it changed since it was built",
                hint=f"never measure a file you cannot vouch for; {REBUILD_HINT}",
            )
    return image


def parse_min_tcb(text: str) -> dict[str, int]:
    """`bootloader=3,tee=0,snp=8,microcode=115` -> a dict (each SPL 0-255)."""
    found: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _TCB_KEYS or not value.strip().isdigit():
            raise UsageError(f"--min-tcb item {item!r} is not NAME=NUMBER",
                             hint=f"names: {', '.join(sorted(_TCB_KEYS))}")  # fmt: skip
        if int(value) > 255 or key in found:
            raise UsageError(f"--min-tcb {key}: one value from 0 to 255")
        found[key] = int(value)
    return found


def _snp_guest_policy(bits: int) -> dict[str, Any]:
    if bits & POLICY_DEBUG:
        raise UsageError(f"SNP guest policy 0x{bits:x} allows debugging (bit 19)",
                         hint="a debug guest's memory is readable by the host")  # fmt: skip
    if bits & POLICY_MIGRATE_MA:
        raise UsageError(f"SNP guest policy 0x{bits:x} allows a migration agent (bit 18)",
                         hint="gcvm launches without one; the policy pins it off")  # fmt: skip
    return {
        "smt": bool(bits & POLICY_SMT),
        "migrate_ma": False,
        "single_socket": bool(bits & POLICY_SINGLE_SOCKET),
        "abi_min": f"{(bits >> 8) & 0xFF}.{bits & 0xFF}",
    }


def reference_policy(
    image_dir: Path,
    firmware: Path,
    *,
    tee: str = "sev-snp",
    vcpus: int = 1,
    vcpu_type: str = "EPYC-v4",
    cmdline_extra: str = "",
    min_tcb: dict[str, int] | None = None,
    vmpl: int = 0,
    guest_features: int = DEFAULT_GUEST_FEATURES,
    snp_policy: int = TeeOptions.snp_policy,
    td_attributes: int = TeeOptions.tdx_policy,
    mrtd: tuple[str, ...] = (),
) -> Reference:
    if tee not in ("sev-snp", "tdx"):
        raise UsageError(f"unknown --tee {tee!r}", hint="sev-snp or tdx")
    if not firmware.is_file():
        hint = SNP_FIRMWARE_HINT if tee == "sev-snp" else (
            "use OVMF.inteltdx.ms.fd from Debian's ovmf-inteltdx: "
            "'gcvm attest firmware --tee tdx' downloads it and prints its path"
        )  # fmt: skip
        raise UsageError(f"firmware {firmware}: no such file", hint=hint)
    if not 0 <= vmpl <= 3:
        raise UsageError(f"--vmpl {vmpl}: a VMPL is 0 to 3")
    image = checked_image(image_dir)
    assert image.kernel is not None and image.initrd is not None  # checked_image refuses none
    try:
        cmdline = guest_cmdline(image.cmdline, cmdline_extra)
    except ValueError as exc:
        raise UsageError(f"--cmdline-extra: {exc}") from None
    ref = Reference(policy={})
    ref.inputs = {
        "image": f"{image.root} (recipe {image.recipe_hash or '-'}, kernel {image.kernel_version})",
        "kernel sha256": image.files_sha256[KERNEL],
        "initrd sha256": image.files_sha256[INITRD],
        "cmdline": cmdline,
        "firmware": f"{firmware} sha256 {file_sha256(firmware)}",
        "vcpus": str(vcpus),
    }
    start = time.monotonic()
    if tee == "sev-snp":
        digest = snp_launch_digest(
            firmware, image.kernel, image.initrd, cmdline, vcpus=vcpus, vcpu_type=vcpu_type,
            guest_features=guest_features, hint=SNP_FIRMWARE_HINT,
        )  # fmt: skip
        ref.inputs.update(
            {"vcpu type": vcpu_type, "guest features": f"0x{guest_features:x}",
             "snp guest policy": f"0x{snp_policy:x}"}
        )  # fmt: skip
        section: dict[str, Any] = {
            "measurements": [digest.hex()],
            "vmpl": [vmpl],
            "allow_debug": False,
            "guest_policy": _snp_guest_policy(snp_policy),
        }
        if min_tcb:
            section["min_tcb"] = dict(min_tcb)
        else:
            ref.notes.append("no --min-tcb: any TCB the AMD key endorses is accepted")
        ref.policy["snp"] = section
    else:
        if td_attributes & 1:
            raise UsageError(f"TD attributes 0x{td_attributes:x} have DEBUG (bit 0) set")
        ref.inputs["td attributes"] = f"0x{td_attributes:x}"
        ref.policy["tdx"] = {
            "mrtd": list(mrtd),
            "td_attributes": f"0x{td_attributes:x}",
            "allow_debug": False,
            "accepted_tcb_status": ["UpToDate"],
        }
        ref.notes.append(TDX_MRTD_NOTE)
    ref.seconds = time.monotonic() - start
    parse_policy(ref.policy, Path("."), "the computed policy")  # the schema the broker loads
    return ref


def render_policy(ref: Reference) -> str:
    """The policy file: a header naming every input, then YAML the broker loads."""
    import yaml

    header = ["# gcvm broker policy: reference values computed by 'gcvm attest policy'"]
    header += [f"#   {key}: {value}" for key, value in ref.inputs.items()]
    header += [
        "# A different kernel, initrd, command line (a different broker or owner pin), firmware,",
        "# vCPU count or type is a different measurement. Add the released keys under resources:",
        "#   resources: {gcvm/model/key: model.key}",
    ]
    body = yaml.safe_dump(ref.policy, sort_keys=False, default_flow_style=False, width=200)
    return "\n".join(header) + "\n" + body
