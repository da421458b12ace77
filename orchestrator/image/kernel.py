"""Facts about the guest kernel: its files in the tree and the TEE support its config enables."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.errors import GcvmError
from orchestrator.image.model import (
    TEE_GUEST_OPTIONS,
)


def tee_guest_support(kernel_config: str) -> dict[str, bool]:
    """Whether a guest kernel with this config can run as a TDX / SEV-SNP guest."""
    enabled = {
        match[1] for match in re.finditer(r"^(CONFIG_\w+)=[ym]\s*$", kernel_config, re.MULTILINE)
    }
    return {
        tee.value: all(opt in enabled for opt in opts) for tee, opts in TEE_GUEST_OPTIONS.items()
    }


def _kernel_files(tree: Path) -> tuple[Path, Path, Path, str]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GcvmError(
            f"expected one kernel in the guest's /boot, found {len(kernels)}",
            hint="check images/packages.txt (one linux-image package)",
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{version}"
    config = tree / "boot" / f"config-{version}"
    for path in (initrd, config):
        if not path.exists():
            raise GcvmError(
                f"the guest has no {path.relative_to(tree)}",
                hint="initramfs-tools must be in images/packages.txt",
            )
    return kernels[0], initrd, config, version
