"""The image's constants and its description (Image), for gcvm's own image and a user's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from orchestrator.spec import Tee

SUITE = "bookworm"
GUEST_VENV = PurePosixPath("/opt/gcvm/venv")
GUEST_PYTHON = str(GUEST_VENV / "bin" / "python")
# The image's own kernel command line; the build appends the dm-verity root hash and hash-tree
# offset (verity_cmdline), so that what a TEE measures pins the root disk's content too.
# panic=10: a failure in the initrd reboots the guest instead of opening a shell on the console
CMDLINE = "root=/dev/mapper/gcvm-root ro console=ttyS0 fsck.mode=skip panic=10"
VERITY_DEVICE = "gcvm-root"  # the dm-verity device the initrd opens (/dev/mapper/...)
ROOT_LABEL = "gcvm-root"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bump when this module changes what a build produces; it is part of the recipe hash.
BUILD_FORMAT = "2"
RECIPE_FILES = (
    "packages.txt",
    "kernel.txt",
    "wheels.txt",
    "wheels-nodeps.txt",
    "dpkg.cfg",
    "customize.sh",
)
RECIPE_TREE = "rootfs"
METADATA = "image.json"
DISK, KERNEL, INITRD, KERNEL_CONFIG = "disk.qcow2", "vmlinuz", "initrd.img", "kernel.config"
GUEST_WHEELS = "/var/tmp/gcvm-wheels"  # inside the tree, removed before the disk is made
# Modules the initrd must hold (as a .ko, or built into the kernel: modules.builtin) to mount the
# root file system from a virtio disk.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "dm_verity", "overlay")
# Files the initrd must hold besides modules: veritysetup and the scripts that use it.
INITRD_FILES = ("veritysetup", "gcvm-verity", "gcvm-overlay")
# Free space left in the guest's root file system beyond what the tree holds: it is mounted
# read-only (dm-verity), so only a little room for mkfs's own bookkeeping.
FREE_BYTES = 64 * 2**20
TOOLS = ("mmdebstrap", "mkfs.ext4", "qemu-img", "chroot", "apt-get", "veritysetup")
# mmdebstrap's hook that makes a local .deb given to --include visible inside the chroot
FILE_HOOKS = "/usr/share/mmdebstrap/hooks/file-mirror-automount"
INSTALL_HINT = (
    "run scripts/install-system-deps.sh (mmdebstrap, e2fsprogs, qemu-utils, cryptsetup-bin)"
)
# Which kernel options make a guest kernel able to run inside each TEE and give its evidence:
# a TDX quote only comes through configfs-tsm (TSM_REPORTS); SNP also has /dev/sev-guest.
TEE_GUEST_OPTIONS: dict[Tee, tuple[str, ...]] = {
    Tee.tdx: ("CONFIG_INTEL_TDX_GUEST", "CONFIG_TDX_GUEST_DRIVER", "CONFIG_TSM_REPORTS"),
    Tee.sev_snp: ("CONFIG_AMD_MEM_ENCRYPT", "CONFIG_SEV_GUEST"),
}


@dataclass(frozen=True)
class Image:
    root: Path  # the cache folder (a user image: the folder holding it)
    disk: Path  # the base disk; VMs run on a qcow2 overlay over it
    kernel: Path | None  # None: the disk boots itself (a user's cloud image)
    initrd: Path | None
    cmdline: str  # kernel command line for direct boot ("" for a user image)
    python: str  # the guest interpreter that has torch
    recipe_hash: str  # "" for a user image
    size_bytes: int  # bytes the image takes on the host
    built_seconds: float
    kernel_version: str
    tee_guest_support: dict[str, bool]  # Tee value -> the guest kernel supports it ({}: unknown)
    disk_format: str = "qcow2"
    python_version: str = ""
    # SHA-256 of the direct-boot files as the build wrote them (KERNEL, INITRD -> hex); what
    # `gcvm attest policy` checks before measuring them ({}: a user image, or built before)
    files_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def direct_boot(self) -> bool:
        return self.kernel is not None

    def supports_tee_guest(self, tee: Tee) -> bool | None:
        """True/False from the guest kernel's config; None when unknown (a user image)."""
        if tee is Tee.none:
            return True
        return self.tee_guest_support.get(tee.value)


def tee_guest_problem(image: Image, tee: Tee) -> str | None:
    """A one-line warning for doctor/up when the image's guest kernel lacks what `tee` needs;
    None when it has it, or when that is unknown (a user's image)."""
    if image.supports_tee_guest(tee) is not False:
        return None
    options = " and ".join(TEE_GUEST_OPTIONS[tee])
    return (
        f"the guest kernel {image.kernel_version} of image {image.recipe_hash or image.disk} "
        f"lacks {tee} guest support ({options} not enabled): it will not boot as a {tee} guest"
    )


def verity_root(image: Image) -> bool:
    """Whether the image's root is a dm-verity disk (gcvm's image since the root is measured):
    its VMs attach it read-only."""
    words = image.cmdline.split()
    return image.kernel is not None and any(w.startswith("gcvm.verity=") for w in words)


def verity_cmdline(root_hash: str, hash_offset: int) -> str:
    """The parameters the initrd's gcvm-verity script reads: the root disk's dm-verity root hash
    and the byte offset of its hash tree on the same disk."""
    if not re.fullmatch(r"[0-9a-f]{64}", root_hash) or hash_offset <= 0 or hash_offset % 4096:
        raise ValueError(f"not a dm-verity root hash and offset: {root_hash!r} {hash_offset}")
    return f"gcvm.verity={root_hash} gcvm.verity_offset={hash_offset}"


def guest_cmdline(image_cmdline: str, extra: str = "") -> str:
    """The kernel command line a VM boots with: the image's, then what the orchestrator appends
    (`gcvm.broker_cert=...`, `gcvm.owner_key=...`), one space between words.

    SEV-SNP measures this string byte for byte (its SHA-256 is in the firmware's kernel-hashes
    table) and TDX extends it into RTMR2: the domain renderer and `gcvm attest policy` both take
    it from here so that the reference measurement is that of the boot. A `gcvm.*` parameter may
    appear once: a guest that read the first of two pins would run with a pin the policy's author
    never saw."""
    words = image_cmdline.split() + extra.split()
    if any(ord(c) < 0x20 or c == "\x7f" for word in words for c in word):
        raise ValueError("a kernel command line holds no control characters")
    seen: set[str] = set()
    for word in words:
        key = word.split("=", 1)[0]
        if key.startswith("gcvm.") and key in seen:
            raise ValueError(f"{key} appears twice in the kernel command line")
        seen.add(key)
    return " ".join(words)
