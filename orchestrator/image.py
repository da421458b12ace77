"""The guest image: build, cache and find gcvm's own Debian image, or take a user's disk image.

gcvm's image is built from the recipe in `images/` (package lists, files copied into the tree, a
customization script) with mmdebstrap from the host's own apt sources, plus a Python venv with
torch installed from wheels downloaded on the host. It is cached under
`images_dir()/<recipe hash>/` as a qcow2 base disk, the kernel and initrd for direct kernel boot,
the kernel's config, and `image.json` (what `find_image` reads back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from orchestrator import ui
from orchestrator.errors import GcvmError, HostUnsupported, ImageMissing, UsageError
from orchestrator.paths import images_dir
from orchestrator.spec import Tee

SUITE = "bookworm"
GUEST_VENV = PurePosixPath("/opt/gcvm/venv")
GUEST_PYTHON = str(GUEST_VENV / "bin" / "python")
CMDLINE = "root=/dev/vda rw console=ttyS0 fsck.mode=skip"
ROOT_LABEL = "gcvm-root"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bump when this module changes what a build produces; it is part of the recipe hash.
BUILD_FORMAT = "1"
RECIPE_FILES = ("packages.txt", "wheels.txt", "wheels-nodeps.txt", "dpkg.cfg", "customize.sh")
RECIPE_TREE = "rootfs"
METADATA = "image.json"
DISK, KERNEL, INITRD, KERNEL_CONFIG = "disk.qcow2", "vmlinuz", "initrd.img", "kernel.config"
GUEST_WHEELS = "/var/tmp/gcvm-wheels"  # inside the tree, removed before the disk is made
# Modules the initrd must hold to mount the root file system from a virtio disk.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# Free space left in the guest's root file system beyond what the tree holds.
FREE_BYTES = 1536 * 2**20
TOOLS = ("mmdebstrap", "mkfs.ext4", "qemu-img", "chroot")
INSTALL_HINT = "run scripts/install-system-deps.sh (mmdebstrap, e2fsprogs, qemu-utils)"
# Which kernel options make a guest kernel able to run inside each TEE.
TEE_GUEST_OPTIONS: dict[Tee, tuple[str, ...]] = {
    Tee.tdx: ("CONFIG_INTEL_TDX_GUEST",),
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


# ---------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class Recipe:
    folder: Path
    packages: tuple[str, ...]
    wheels: tuple[str, ...]
    wheels_nodeps: tuple[str, ...]

    @property
    def dpkg_cfg(self) -> Path:
        return self.folder / "dpkg.cfg"

    @property
    def customize(self) -> Path:
        return self.folder / "customize.sh"

    @property
    def tree(self) -> Path:
        return self.folder / RECIPE_TREE


def recipe_folder() -> Path:
    return Path(str(resources.files("images")))


def _list_file(path: Path) -> tuple[str, ...]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


def load_recipe(folder: Path | None = None) -> Recipe:
    folder = folder or recipe_folder()
    return Recipe(
        folder=folder,
        packages=_list_file(folder / "packages.txt"),
        wheels=_list_file(folder / "wheels.txt"),
        wheels_nodeps=_list_file(folder / "wheels-nodeps.txt"),
    )


def recipe_inputs(folder: Path | None = None) -> list[tuple[str, bytes]]:
    """What the recipe hash covers, in order: build constants, then every recipe file."""
    folder = folder or recipe_folder()
    constants = f"format={BUILD_FORMAT}\nsuite={SUITE}\nvenv={GUEST_VENV}\ncmdline={CMDLINE}\n"
    inputs = [("constants", constants.encode())]
    paths = [folder / name for name in RECIPE_FILES]
    paths += sorted(p for p in (folder / RECIPE_TREE).rglob("*") if p.is_file() or p.is_symlink())
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            inputs.append((f"{rel} -> link", os.readlink(path).encode()))
        else:
            mode = "x" if os.access(path, os.X_OK) else "-"
            inputs.append((f"{rel} {mode}", path.read_bytes()))
    return inputs


def recipe_hash(folder: Path | None = None) -> str:
    digest = hashlib.sha256()
    for name, data in recipe_inputs(folder):
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The host's apt sources


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str | None = None

    def line(self) -> str:
        """A one-line sources.list entry, as mmdebstrap takes it for a MIRROR argument."""
        options = f" [signed-by={self.signed_by}]" if self.signed_by else ""
        return f"deb{options} {self.uri} {self.suite} {' '.join(self.components)}"


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = None
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif raw[0] in " \t" and key is not None:
            fields[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()


def parse_deb822(text: str) -> list[AptSource]:
    sources = []
    for fields in _deb822_paragraphs(text):
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        signed_by = fields.get("signed-by")
        if signed_by and "\n" in signed_by:  # an inline key block cannot go on one line
            signed_by = None
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                sources.append(AptSource(uri, suite, components, signed_by))
    return sources


_ONE_LINE = re.compile(
    r"^deb\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)"
    r"(?P<components>(?:\s+\S+)*)\s*$"
)


def parse_one_line(text: str) -> list[AptSource]:
    sources = []
    for raw in text.splitlines():
        match = _ONE_LINE.match(raw.split("#", 1)[0].strip())
        if not match:
            continue
        options = dict(opt.split("=", 1) for opt in (match["options"] or "").split() if "=" in opt)
        sources.append(
            AptSource(
                match["uri"],
                match["suite"],
                tuple(match["components"].split()),
                options.get("signed-by"),
            )
        )
    return sources


def host_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    sources = []
    if (etc_apt / "sources.list").exists():
        sources += parse_one_line((etc_apt / "sources.list").read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text())
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text())
    return sources


def debian_sources(sources: Sequence[AptSource], suite: str = SUITE) -> list[AptSource]:
    """The Debian entries for `suite`: the suite itself and its -updates/-security/... suites.
    Third-party repositories (their own suite names) are left out."""
    chosen = [s for s in sources if s.suite == suite or s.suite.startswith(f"{suite}-")]
    unique = list(dict.fromkeys(chosen))
    if not any(s.suite == suite for s in unique):
        raise HostUnsupported(
            f"the host's apt sources have no Debian '{suite}' entry to build the guest from",
            hint="add the Debian mirror you use to /etc/apt/sources.list.d/debian.sources",
        )
    return unique


# ---------------------------------------------------------------------------------------------
# Running the build's commands


def _log_tail(log_path: Path, lines: int = 8) -> str:
    with log_path.open("rb") as handle:
        handle.seek(max(0, log_path.stat().st_size - 8192))
        text = handle.read().decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    argv: Sequence[str],
    log_path: Path,
    *,
    timeout: float = 1800,
    stdin: str | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` with its output going to the build log as it comes (stdout is kept instead
    when `capture`); raise GcvmError with the log's tail when it fails and `check`."""
    command = subprocess.list2cmdline(list(argv))
    ui.log.debug("run: %s", command)
    with log_path.open("a") as log_file:
        log_file.write(f"$ {command}\n")
        log_file.flush()
        try:
            proc = subprocess.run(
                list(argv),
                input=stdin,
                text=True,
                timeout=timeout,
                check=False,
                stdout=subprocess.PIPE if capture else log_file,
                stderr=log_file,
            )
        except subprocess.TimeoutExpired:
            raise GcvmError(
                f"{argv[0]} took longer than {timeout:.0f} s", hint=f"see {log_path}"
            ) from None
    if capture:
        with log_path.open("a") as log_file:
            log_file.write(proc.stdout)
    if check and proc.returncode != 0:
        raise GcvmError(
            f"image build failed: {command[:200]} exited with {proc.returncode}\n"
            f"{_log_tail(log_path)}",
            hint=f"the full output is in {log_path}",
        )
    return proc


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    mounts = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix.rstrip("/"):
                mounts.append(point)
    return mounts


def remove_tree(path: Path) -> None:
    """Delete a build folder, refusing to descend into anything still mounted under it (a
    crashed mmdebstrap may leave /proc, /sys or /dev bind mounts in its tree)."""
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    if left := _mounts_under(path):
        raise GcvmError(
            f"cannot delete {path}: {left[0]} is still mounted",
            hint=f"unmount it ('umount -R {left[0]}'), then delete {path}",
        )
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Kernel facts


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


# ---------------------------------------------------------------------------------------------
# Finding an image


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
    )


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
    fmt = disk_format(path)
    if fmt not in ("qcow2", "raw"):
        raise UsageError(f"--image {path} is a {fmt} image", hint="use a qcow2 or raw disk image")
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


# ---------------------------------------------------------------------------------------------
# Building


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
    _run([*pip, "--no-deps", *build.recipe.wheels_nodeps], build.log)
    ui.info(
        f"{len(list(build.wheels.glob('*.whl')))} wheels, "
        f"{_dir_bytes(build.wheels) / 2**20:.0f} MiB, for Python {_python_tag()}"
    )


def _bootstrap(build: _Build, sources: Sequence[AptSource]) -> None:
    """mmdebstrap into a tree that already holds images/rootfs/, so that the packages' own
    scripts see it (the initramfs settings shape the initrd the kernel package makes)."""
    build.tree.mkdir(mode=0o755)
    shutil.copytree(build.recipe.tree, build.tree, symlinks=True, dirs_exist_ok=True)
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--skip=check/empty",
        f"--include={','.join(build.recipe.packages)}",
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


def _check_initrd(build: _Build, initrd: Path) -> None:
    """The initrd must hold the modules to mount the root disk (see initramfs-tools in rootfs)."""
    listing = build.chroot(
        "lsinitramfs", "/" + initrd.relative_to(build.tree).as_posix(), capture=True
    ).stdout
    present = {Path(line).name.split(".ko")[0] for line in listing.splitlines() if ".ko" in line}
    missing = [module for module in INITRD_MODULES if module not in present]
    if missing:
        raise GcvmError(
            f"the guest's initrd lacks {', '.join(missing)}: it could not mount its root disk",
            hint="check images/rootfs/etc/initramfs-tools/hooks/gcvm",
        )
    ui.info(f"initrd: {initrd.stat().st_size / 2**20:.1f} MiB, {len(present)} modules")


def _export_kernel(build: _Build) -> tuple[str, dict[str, bool]]:
    kernel, initrd, config, version = _kernel_files(build.tree)
    _check_initrd(build, initrd)
    for source, name in ((kernel, KERNEL), (initrd, INITRD), (config, KERNEL_CONFIG)):
        shutil.copyfile(source, build.work / name)
        os.chmod(build.work / name, 0o644)
    support = tee_guest_support(config.read_text())
    ui.info(
        f"kernel {version}; guest support: "
        + ", ".join(f"{tee} {'yes' if ok else 'no'}" for tee, ok in support.items())
    )
    return version, support


def _make_disk(build: _Build) -> None:
    raw = build.work / "disk.raw"
    size_mib = (_tree_bytes(build.tree) * 11 // 10 + FREE_BYTES) // 2**20 + 1
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
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
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(build.work / DISK)], build.log)
    raw.unlink()
    os.chmod(build.work / DISK, 0o644)
    ui.info(
        f"disk: {size_mib} MiB file system, qcow2 "
        f"{(build.work / DISK).stat().st_blocks * 512 / 2**20:.0f} MiB"
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
            with ui.step(
                f"bootstrap Debian {SUITE} with mmdebstrap "
                f"({len(recipe.packages)} packages, "
                f"{len(sources)} apt sources from the host)"
            ):
                _bootstrap(build, sources)
            with ui.step("configure the guest (images/customize.sh: units, host keys, ...)"):
                _configure(build)
            with ui.step(f"install the Python venv {GUEST_VENV}"):
                python_version = _install_venv(build)
            with ui.step("export kernel and initrd for direct boot"):
                kernel_version, support = _export_kernel(build)
            with ui.step("make the qcow2 disk (mkfs.ext4 -d, qemu-img convert)"):
                _make_disk(build)
            remove_tree(build.wheels)
            image = Image(
                root=folder / wanted,
                disk=folder / wanted / DISK,
                kernel=folder / wanted / KERNEL,
                initrd=folder / wanted / INITRD,
                cmdline=CMDLINE,
                python=GUEST_PYTHON,
                recipe_hash=wanted,
                size_bytes=_dir_bytes(work),
                built_seconds=round(time.monotonic() - start, 1),
                kernel_version=kernel_version,
                tee_guest_support=support,
                python_version=python_version,
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


def describe_image(image: Image) -> None:
    """Print an image's facts (a table on stdout)."""
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows = [
        ("recipe hash", image.recipe_hash or "(user image)"),
        ("folder", str(image.root)),
        ("disk", f"{image.disk} ({image.disk_format})"),
        ("kernel", f"{image.kernel} ({image.kernel_version})" if image.kernel else "(own boot)"),
        ("initrd", str(image.initrd) if image.initrd else "-"),
        ("cmdline", image.cmdline or "-"),
        ("python", f"{image.python} {image.python_version}".strip()),
        ("size", f"{image.size_bytes / 2**20:.0f} MiB"),
        ("built in", f"{image.built_seconds:.0f} s"),
        (
            "TEE guest support",
            ", ".join(
                f"{tee}: {'yes' if ok else 'no'}" for tee, ok in image.tee_guest_support.items()
            )
            or "unknown",
        ),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    ui.out.print(table)
