"""`gcvm doctor`'s guest side: can gcvm's own image be a TDX or SEV-SNP guest that gives
evidence, and is the firmware its launch is measured with at hand. One line per fact, each with
what to do.

The kernel facts come from the image's recorded kernel config (`kernel.config` beside the disk,
exported at build time): the TDX guest (INTEL_TDX_GUEST and the tdx_guest driver), the SNP guest
(AMD_MEM_ENCRYPT and the sev-guest driver) and configfs-tsm (TSM_REPORTS), through which the guest
asks for a TDX quote or an SNP report with its certificate table. The firmware facts say whether
`gcvm attest firmware` has cached Debian's TDVF and AMD SEV OVMF builds."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import GcvmError
from orchestrator.hostcaps import Check

KERNEL_HINT = (
    "run 'gcvm image build': the recipe pins bookworm-backports' 6.12 cloud kernel "
    "(images/kernel.txt); Debian 12's 6.1 has neither"
)
GUEST_KERNEL: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("image kernel: TDX guest", ("CONFIG_INTEL_TDX_GUEST", "CONFIG_TDX_GUEST_DRIVER"), KERNEL_HINT),
    ("image kernel: SEV-SNP guest", ("CONFIG_AMD_MEM_ENCRYPT", "CONFIG_SEV_GUEST"), KERNEL_HINT),
    (
        "image kernel: configfs-tsm",
        ("CONFIG_TSM_REPORTS",),
        "a kernel >= 6.7 with TSM_REPORTS; without it TDX gives no quote and SNP falls back to "
        "/dev/sev-guest",
    ),
)
FIRMWARE = (
    ("tdx", "TDX firmware (OVMF.inteltdx.ms.fd)"),
    ("sev-snp", "SNP firmware (OVMF.amdsev.fd)"),
)


def enabled_options(kernel_config: str) -> set[str]:
    return {m[1] for m in re.finditer(r"^(CONFIG_\w+)=[ym]\s*$", kernel_config, re.MULTILINE)}


def kernel_checks(kernel_config: str | None, where: str) -> list[Check]:
    """One line per guest capability; unknown (None) where the image recorded no config."""
    if kernel_config is None:
        return [Check(name, None, where, fix) for name, _, fix in GUEST_KERNEL]
    enabled = enabled_options(kernel_config)
    rows = []
    for name, options, fix in GUEST_KERNEL:
        missing = [o.removeprefix("CONFIG_") for o in options if o not in enabled]
        detail = "yes" if not missing else f"no ({', '.join(missing)} not set)"
        rows.append(Check(name, not missing, detail, "" if not missing else fix))
    return rows


def firmware_checks(cached: Callable[[str], Any]) -> list[Check]:
    rows = []
    for tee, name in FIRMWARE:
        found = cached(tee)
        if found is None:
            rows.append(Check(name, False, "not cached", f"gcvm attest firmware --tee {tee}"))
        else:
            rows.append(Check(name, True, f"{found.path} ({found.package} {found.version})"))
    return rows


def image_kernel_config() -> tuple[str | None, str]:
    """The current recipe's image's kernel config, or None and why it is unknown."""
    from orchestrator.image import KERNEL_CONFIG, find_image

    try:
        image = find_image()
    except GcvmError as exc:
        return None, f"unknown: {exc.message}"
    path: Path = image.root / KERNEL_CONFIG
    try:
        return path.read_text(errors="replace"), str(path)
    except OSError:
        return None, f"unknown: the image records no {KERNEL_CONFIG} (rebuild it)"


def guest_checks() -> list[Check]:
    from orchestrator.attest.firmware import cached_firmware

    config, where = image_kernel_config()
    return kernel_checks(config, where) + firmware_checks(cached_firmware)
