"""`gcvm image build`: locked, cached by recipe hash, published atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator import ui
from orchestrator.digests import file_sha256
from orchestrator.errors import HostUnsupported, ImageMissing
from orchestrator.image.apt import debian_sources, host_apt_sources
from orchestrator.image.commands import remove_tree
from orchestrator.image.lookup import find_image
from orchestrator.image.model import (
    CMDLINE,
    DISK,
    GUEST_PYTHON,
    GUEST_VENV,
    INITRD,
    INSTALL_HINT,
    KERNEL,
    METADATA,
    SUITE,
    TOOLS,
    Image,
    verity_cmdline,
)
from orchestrator.image.pinned import fetch_kernel
from orchestrator.image.recipe import load_recipe, recipe_hash
from orchestrator.image.steps import (
    _bootstrap,
    _Build,
    _configure,
    _dir_bytes,
    _download_wheels,
    _export_kernel,
    _install_venv,
    _make_disk,
)
from orchestrator.paths import images_dir


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ui.info("another 'gcvm image build' is running; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _check_host() -> None:
    if os.geteuid() != 0:
        raise HostUnsupported(
            "building the guest image needs root (mmdebstrap --mode=root)",
            hint="run 'sudo gcvm image build'",
        )
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise HostUnsupported(
            f"missing tools to build the image: {', '.join(missing)}", hint=INSTALL_HINT
        )


def _clean_stale(folder: Path) -> None:
    """Remove what an interrupted build left behind (the caller holds the build lock)."""
    for stale in folder.glob(".build-*"):
        if stale.is_dir():
            ui.info(f"removing {stale.name} left by an interrupted build")
            remove_tree(stale)


def _publish(work: Path, final: Path) -> None:
    """Move the finished image into place atomically (a rename within images_dir())."""
    old = None
    if final.exists():
        old = final.with_name(f".build-old-{final.name}-{os.getpid()}")
        final.rename(old)
    work.rename(final)
    if old is not None:
        remove_tree(old)


def build_image(force: bool = False) -> Image:
    """Build the guest image for the current recipe (or return the cached one)."""
    wanted = recipe_hash()
    if not force:
        with contextlib.suppress(ImageMissing):
            image = find_image()
            ui.info(f"image {wanted} is already built: {image.root}")
            return image
    _check_host()
    folder = images_dir()
    with _build_lock(folder):
        if not force:
            with contextlib.suppress(ImageMissing):
                return find_image()  # built while this one waited for the lock
        _clean_stale(folder)
        return _build_locked(folder, wanted)


def _build_locked(folder: Path, wanted: str) -> Image:
    recipe = load_recipe()
    sources = debian_sources(host_apt_sources())
    work = folder / f".build-{wanted}-{os.getpid()}"
    work.mkdir(mode=0o755)
    build = _Build(recipe=recipe, hash=wanted, work=work, log=folder / f"build-{wanted}.log")
    build.log.write_text("")
    start = time.monotonic()
    try:
        with ui.step(f"build guest image {wanted} (Debian {SUITE}, log: {build.log})"):
            with ui.step("download wheels with the host's pip"):
                _download_wheels(build)
            pin = recipe.kernel
            with ui.step(f"the pinned kernel {pin.package} {pin.version} ({pin.suite})"):
                kernel_deb = fetch_kernel(pin, sources, build.log)
            with ui.step(
                f"bootstrap Debian {SUITE} with mmdebstrap "
                f"({len(recipe.packages)} packages, "
                f"{len(sources)} apt sources from the host)"
            ):
                _bootstrap(build, sources, kernel_deb)
            with ui.step("configure the guest (images/customize.sh: units, host keys, ...)"):
                _configure(build)
            with ui.step(f"install the Python venv {GUEST_VENV}"):
                python_version = _install_venv(build)
            with ui.step("export kernel and initrd for direct boot"):
                kernel_version, support = _export_kernel(build)
            with ui.step("make the disk (mkfs.ext4 -d, veritysetup format, qemu-img convert)"):
                root_hash, hash_offset = _make_disk(build)
            remove_tree(build.wheels)
            image = Image(
                root=folder / wanted,
                disk=folder / wanted / DISK,
                kernel=folder / wanted / KERNEL,
                initrd=folder / wanted / INITRD,
                cmdline=f"{CMDLINE} {verity_cmdline(root_hash, hash_offset)}",
                python=GUEST_PYTHON,
                recipe_hash=wanted,
                size_bytes=_dir_bytes(work),
                built_seconds=round(time.monotonic() - start, 1),
                kernel_version=kernel_version,
                tee_guest_support=support,
                python_version=python_version,
                files_sha256=boot_file_digests(work),
            )
            _write_metadata(image, work)
            _publish(work, image.root)
    except BaseException:
        remove_tree(work)
        raise
    ui.info(
        f"image {wanted}: {image.size_bytes / 2**20:.0f} MiB in {image.root}, "
        f"built in {image.built_seconds:.0f} s"
    )
    return image


def boot_file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of the direct-boot files in an image folder (KERNEL, INITRD): the build's record
    of what it produced, which `gcvm attest policy` checks before it measures them."""
    return {name: file_sha256(folder / name) for name in (KERNEL, INITRD)}


def _write_metadata(image: Image, work: Path) -> None:
    data = dataclasses.asdict(image)
    data.update(
        root=None,
        disk=DISK,
        kernel=KERNEL,
        initrd=INITRD,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        suite=SUITE,
    )
    (work / METADATA).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
