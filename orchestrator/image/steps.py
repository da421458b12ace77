"""The build's steps, each on a _Build: wheels, bootstrap, configure, venv, kernel, disk."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator import ui
from orchestrator.errors import GcvmError, HostUnsupported
from orchestrator.image.apt import AptSource
from orchestrator.image.commands import _run, remove_tree
from orchestrator.image.kernel import _kernel_files, tee_guest_support
from orchestrator.image.model import (
    DISK,
    FILE_HOOKS,
    FREE_BYTES,
    GUEST_PATH,
    GUEST_PYTHON,
    GUEST_VENV,
    GUEST_WHEELS,
    INITRD,
    INITRD_FILES,
    INITRD_MODULES,
    KERNEL,
    KERNEL_CONFIG,
    ROOT_LABEL,
    SUITE,
)
from orchestrator.image.recipe import Recipe


def _tree_bytes(tree: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class _Build:
    recipe: Recipe
    hash: str
    work: Path  # the temporary folder that becomes images_dir()/<hash>
    log: Path

    @property
    def tree(self) -> Path:
        return self.work / "tree"

    @property
    def wheels(self) -> Path:
        return self.work / "wheels"

    def chroot(
        self, *argv: str, stdin: str | None = None, capture: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the guest tree with a clean environment (none of the host's PIP_*)."""
        env = ["env", "-i", f"PATH={GUEST_PATH}", "HOME=/root", "LANG=C.UTF-8"]
        return _run(
            ["chroot", str(self.tree), *env, *argv],
            self.log,
            stdin=stdin,
            capture=capture,
            check=check,
        )


def _download_wheels(build: _Build) -> None:
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--dest",
        str(build.wheels),
        "--no-input",
        "--disable-pip-version-check",
    ]
    _run([*pip, *build.recipe.wheels], build.log)
    if build.recipe.wheels_nodeps:
        _run([*pip, "--no-deps", *build.recipe.wheels_nodeps], build.log)
    ui.info(
        f"{len(list(build.wheels.glob('*.whl')))} wheels, "
        f"{_dir_bytes(build.wheels) / 2**20:.0f} MiB, for Python {_python_tag()}"
    )


def _bootstrap(build: _Build, sources: Sequence[AptSource], kernel_deb: Path) -> None:
    """mmdebstrap into a tree that already holds images/rootfs/, so that the packages' own
    scripts see it (the initramfs settings shape the initrd the kernel package makes). The
    pinned kernel is a local .deb that apt installs with the rest (its dependencies resolved
    from the suite); mmdebstrap's file-mirror hook makes its path visible in the chroot."""
    build.tree.mkdir(mode=0o755)
    shutil.copytree(build.recipe.tree, build.tree, symlinks=True, dirs_exist_ok=True)
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--skip=check/empty",
        f"--hook-dir={FILE_HOOKS}",
        f"--include={','.join((*build.recipe.packages, str(kernel_deb)))}",
        f"--dpkgopt={build.recipe.dpkg_cfg}",
        '--aptopt=Acquire::Languages "none"',
        SUITE,
        str(build.tree),
        *(source.line() for source in sources),
    ]
    _run(argv, build.log, timeout=3600)


def _configure(build: _Build) -> None:
    build.chroot("/bin/sh", "-s", stdin=build.recipe.customize.read_text())


def _install_venv(build: _Build) -> str:
    guest_python = build.chroot(
        "python3",
        "-c",
        "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        capture=True,
    ).stdout.strip()
    if guest_python != _python_tag():
        raise HostUnsupported(
            f"the guest has Python {guest_python} but the host's pip downloaded wheels for "
            f"Python {_python_tag()}",
            hint=f"run gcvm with a Python {guest_python} interpreter",
        )
    target = build.tree / GUEST_WHEELS.lstrip("/")
    shutil.copytree(build.wheels, target)
    venv_pip = [
        str(GUEST_VENV / "bin" / "pip"),
        "install",
        "--no-index",
        "--find-links",
        GUEST_WHEELS,
        "--no-input",
        "--disable-pip-version-check",
    ]
    try:
        build.chroot("python3", "-m", "venv", str(GUEST_VENV))
        build.chroot(*venv_pip, *build.recipe.wheels)
        if build.recipe.wheels_nodeps:
            build.chroot(*venv_pip, "--no-deps", *build.recipe.wheels_nodeps)
        _byte_compile(build)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    version = build.chroot(
        GUEST_PYTHON, "-c", "import sys; print(sys.version.split()[0])", capture=True
    )
    return version.stdout.strip()


def _byte_compile(build: _Build) -> None:
    """Byte-compile the venv (pip compiled most of it already). Files written for newer
    Pythons (torch ships a few test helpers in 3.12 syntax) fail and are listed, not fatal."""
    proc = build.chroot(
        GUEST_PYTHON,
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        str(GUEST_VENV / "lib"),
        capture=True,
        check=False,
    )
    failed = re.findall(r"^\*\*\* Error compiling '([^']+)'", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 and not failed:
        raise GcvmError(
            f"byte-compiling the guest venv failed ({proc.returncode})",
            hint=f"see {build.log}",
        )
    if failed:
        ui.info(
            f"{len(failed)} file(s) not byte-compiled (syntax of a newer Python): "
            + ", ".join(Path(name).name for name in failed[:5])
        )


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _check_initrd(build: _Build, initrd: Path, version: str) -> None:
    """The initrd must be able to mount the root disk (see initramfs-tools in rootfs): each
    module it needs is in it, or built into the kernel (the 6.12 cloud kernel has virtio_pci
    and ext4 built in: they are listed in modules.builtin, not shipped as .ko files)."""
    listing = build.chroot(
        "lsinitramfs", "/" + initrd.relative_to(build.tree).as_posix(), capture=True
    ).stdout
    present = {_module_name(line) for line in listing.splitlines() if ".ko" in line}
    builtin_list = build.tree / "usr/lib/modules" / version / "modules.builtin"
    builtin = {_module_name(line) for line in builtin_list.read_text().split() if ".ko" in line}
    missing = [module for module in INITRD_MODULES if module not in present | builtin]
    names = {Path(line).name for line in listing.splitlines()}
    missing += [name for name in INITRD_FILES if name not in names]
    if missing:
        raise GcvmError(
            f"the guest's initrd lacks {', '.join(missing)}: it could not mount its root disk",
            hint="check images/rootfs/etc/initramfs-tools/hooks/gcvm",
        )
    ui.info(
        f"initrd: {initrd.stat().st_size / 2**20:.1f} MiB, {len(present)} modules "
        f"(built in: {', '.join(m for m in INITRD_MODULES if m in builtin) or 'none'})"
    )


def _export_kernel(build: _Build) -> tuple[str, dict[str, bool]]:
    kernel, initrd, config, version = _kernel_files(build.tree)
    if version != build.recipe.kernel.release:
        raise GcvmError(
            f"the guest has kernel {version}, not the pinned {build.recipe.kernel.release}",
            hint="images/packages.txt must not name another linux-image package",
        )
    _check_initrd(build, initrd, version)
    for source, name in ((kernel, KERNEL), (initrd, INITRD), (config, KERNEL_CONFIG)):
        shutil.copyfile(source, build.work / name)
        os.chmod(build.work / name, 0o644)
    support = tee_guest_support(config.read_text())
    ui.info(
        f"kernel {version}; guest support: "
        + ", ".join(f"{tee} {'yes' if ok else 'no'}" for tee, ok in support.items())
    )
    return version, support


def _make_disk(build: _Build) -> tuple[str, int]:
    """The root file system (ext4, no journal: it is never written), followed on the same disk
    by its dm-verity hash tree; returns the root hash and the hash tree's byte offset."""
    raw = build.work / "disk.raw"
    size_mib = (_tree_bytes(build.tree) * 11 // 10 + FREE_BYTES) // 2**20 + 1
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
            str(build.tree),
            str(raw),
            f"{size_mib}M",
        ],
        build.log,
    )
    remove_tree(build.tree)
    offset = size_mib * 2**20
    root_hash_file = build.work / "root.hash"
    _run(
        [
            "veritysetup",
            "format",
            f"--data-blocks={offset // 4096}",
            f"--hash-offset={offset}",
            f"--root-hash-file={root_hash_file}",
            str(raw),
            str(raw),
        ],
        build.log,
    )
    root_hash = root_hash_file.read_text().strip()
    root_hash_file.unlink()
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(build.work / DISK)], build.log)
    raw.unlink()
    os.chmod(build.work / DISK, 0o644)
    ui.info(
        f"disk: {size_mib} MiB file system + dm-verity hash tree, qcow2 "
        f"{(build.work / DISK).stat().st_blocks * 512 / 2**20:.0f} MiB; root hash {root_hash}"
    )
    return root_hash, offset
