"""Finding an image: gcvm's own built one by recipe hash, or a user's disk (`--image`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from orchestrator.errors import HostUnsupported, ImageMissing, UsageError
from orchestrator.image.model import (
    INSTALL_HINT,
    METADATA,
    Image,
)
from orchestrator.image.recipe import recipe_hash
from orchestrator.image.signature import disk_signature
from orchestrator.paths import images_dir


def _metadata_to_image(root: Path) -> Image:
    data = json.loads((root / METADATA).read_text())
    return Image(
        root=root,
        disk=root / data["disk"],
        kernel=root / data["kernel"],
        initrd=root / data["initrd"],
        cmdline=data["cmdline"],
        python=data["python"],
        recipe_hash=data["recipe_hash"],
        size_bytes=int(data["size_bytes"]),
        built_seconds=float(data["built_seconds"]),
        kernel_version=data["kernel_version"],
        tee_guest_support=dict(data["tee_guest_support"]),
        disk_format=data.get("disk_format", "qcow2"),
        python_version=data.get("python_version", ""),
        files_sha256=dict(data.get("files_sha256") or {}),
    )


def image_at(root: Path) -> Image:
    """The built image in folder `root` (its image.json), for commands given an image folder."""
    if not (root / METADATA).is_file():
        raise UsageError(
            f"{root} holds no built image (no {METADATA})",
            hint="give a folder that 'gcvm image build' made (see 'gcvm image info')",
        )
    try:
        return _metadata_to_image(root)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"the image in {root} is unreadable: {exc}") from None


def find_image() -> Image:
    """The built image for the current recipe, or ImageMissing."""
    wanted = recipe_hash()
    root = images_dir() / wanted
    if not (root / METADATA).exists():
        raise ImageMissing(
            f"no guest image for recipe {wanted} under {images_dir()}",
            hint="run 'gcvm image build'",
        )
    try:
        image = _metadata_to_image(root)
    except (OSError, ValueError, KeyError) as exc:
        raise ImageMissing(
            f"the image in {root} is unreadable: {exc}", hint="run 'gcvm image build --force'"
        ) from None
    for path in (image.disk, image.kernel, image.initrd):
        if path is not None and not path.exists():
            raise ImageMissing(
                f"the image in {root} lacks {path.name}", hint="run 'gcvm image build --force'"
            )
    return image


def disk_format(path: Path) -> str:
    """qemu-img's idea of a disk's format ("qcow2", "raw", ...)."""
    try:
        proc = subprocess.run(
            ["qemu-img", "info", "--output", "json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        raise HostUnsupported("qemu-img is not installed", hint=INSTALL_HINT) from None
    if proc.returncode != 0:
        raise UsageError(f"qemu-img cannot read {path}: {proc.stderr.strip()}")
    return str(json.loads(proc.stdout)["format"])


def user_image(path: Path) -> Image:
    """A user's own disk image (`--image PATH`), e.g. a cloud image: it boots with its own
    bootloader and cloud-init configures it from the same seed."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"--image {path}: no such file")
    try:
        signature = disk_signature(path)
    except OSError as exc:
        raise UsageError(f"cannot read --image {path}: {exc.strerror or exc}") from None
    fmt = disk_format(path)
    if fmt not in ("qcow2", "raw"):
        raise UsageError(f"--image {path} is a {fmt} image", hint="use a qcow2 or raw disk image")
    if fmt == "raw" and signature not in ("gpt", "mbr", "ext4"):
        raise UsageError(
            f"--image {path} is not a disk image: no qcow2 header, no partition table "
            "(GPT or MBR) and no ext4 file system",
            hint="give a qcow2 or raw disk image, e.g. a distribution's cloud image",
        )
    return Image(
        root=path.parent,
        disk=path,
        kernel=None,
        initrd=None,
        cmdline="",
        python="python3",
        recipe_hash="",
        size_bytes=path.stat().st_blocks * 512,
        built_seconds=0.0,
        kernel_version="",
        tee_guest_support={},
        disk_format=fmt,
    )
