"""What a disk file holds, from its first bytes: a qcow2 header, a partition table (GPT or MBR)
or an ext2/3/4 file system. qemu-img calls anything it does not know "raw"; this does not."""

from __future__ import annotations

from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
GPT_MAGIC = b"EFI PART"  # at LBA 1 (byte 512)
MBR_MAGIC = b"\x55\xaa"  # the boot signature at bytes 510-511
EXT_MAGIC = b"\x53\xef"  # 0xEF53 little-endian, at byte 56 of the superblock (byte 1024)
HEAD_BYTES = 2048


def disk_signature(path: Path) -> str | None:
    """ "qcow2", "gpt", "mbr" or "ext4" (any ext2/3/4) from the file's head; None: none of them.
    OSError when the file cannot be read."""
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    if head[512:520] == GPT_MAGIC:
        return "gpt"
    if head[510:512] == MBR_MAGIC:
        return "mbr"
    if head[1024 + 56 : 1024 + 58] == EXT_MAGIC:
        return "ext4"
    return None
