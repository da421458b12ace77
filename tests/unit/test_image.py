"""The guest image: recipe hash, host apt sources, kernel facts, the cache, user images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import image
from orchestrator.errors import HostUnsupported, ImageMissing, UsageError
from orchestrator.spec import Tee

RECIPE = image.recipe_folder()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GCVM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


@pytest.fixture
def recipe_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "recipe"
    shutil.copytree(
        RECIPE, folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return folder


# --- the recipe --------------------------------------------------------------------------------


def test_recipe_lists_what_the_image_needs() -> None:
    recipe = image.load_recipe()
    for package in (
        "systemd-sysv",
        "udev",
        "dbus",
        "kmod",
        "openssh-server",
        "python3",
        "python3-venv",
        "iproute2",
        "netbase",
        "initramfs-tools",
    ):
        assert package in recipe.packages
    # the kernel is the pinned one (kernel.txt), never an unpinned linux-image package
    assert not any(p.startswith("linux-image") for p in recipe.packages)
    pin = recipe.kernel
    assert pin.package == "linux-image-6.12.95+deb12-cloud-amd64"
    assert (pin.version, pin.suite) == ("6.12.95-1~bpo12+1", "bookworm-backports")
    assert len(pin.sha256) == 64 and pin.release == "6.12.95+deb12-cloud-amd64"
    assert "cloud-init" not in recipe.packages
    assert "torch==2.13.0" in recipe.wheels  # any other torch request pulls a CUDA build
    assert recipe.wheels_nodeps == ()  # no model in the image: models arrive as packages
    assert not any("minilm" in w for w in recipe.wheels)
    assert (recipe.tree / "usr/local/sbin/gcvm-seed").stat().st_mode & 0o111


def test_recipe_hash_covers_every_recipe_file() -> None:
    names = [name for name, _data in image.recipe_inputs()]
    assert names[0] == "constants"
    for expected in (
        "packages.txt -",
        "kernel.txt -",
        "wheels.txt -",
        "wheels-nodeps.txt -",
        "dpkg.cfg -",
        "customize.sh -",
        "rootfs/usr/local/sbin/gcvm-seed x",
        "rootfs/etc/systemd/system/gcvm-seed.service -",
        "rootfs/etc/systemd/network/99-gcvm-dhcp.network -",
        "rootfs/etc/ssh/sshd_config.d/gcvm.conf -",
        "rootfs/etc/initramfs-tools/hooks/gcvm x",
        "rootfs/etc/initramfs-tools/conf.d/gcvm.conf -",
        "rootfs/etc/modprobe.d/gcvm.conf -",
    ):
        assert expected in names


def test_recipe_hash_is_stable_and_changes_with_the_recipe(recipe_copy: Path) -> None:
    base = image.recipe_hash(recipe_copy)
    assert base == image.recipe_hash(RECIPE) == image.recipe_hash(recipe_copy)
    assert len(base) == 16
    packages = recipe_copy / "packages.txt"
    packages.write_text(packages.read_text() + "less\n")
    changed = image.recipe_hash(recipe_copy)
    assert changed != base
    (recipe_copy / "rootfs/etc/extra.conf").write_text("x\n")
    assert image.recipe_hash(recipe_copy) not in (base, changed)


def test_recipe_hash_sees_the_executable_bit(recipe_copy: Path) -> None:
    base = image.recipe_hash(recipe_copy)
    os.chmod(recipe_copy / "rootfs/usr/local/sbin/gcvm-seed", 0o644)
    assert image.recipe_hash(recipe_copy) != base


def test_recipe_scripts_parse() -> None:
    for script in (
        RECIPE / "customize.sh",
        RECIPE / "rootfs/usr/local/sbin/gcvm-seed",
        RECIPE / "rootfs/etc/initramfs-tools/hooks/gcvm",
    ):
        subprocess.run(["sh", "-n", str(script)], check=True)


def test_initramfs_hook_holds_the_checked_modules() -> None:
    hook = (RECIPE / "rootfs/etc/initramfs-tools/hooks/gcvm").read_text()
    for module in image.INITRD_MODULES:
        assert module in hook
    assert "copy_exec /usr/sbin/veritysetup" in hook
    assert "cryptsetup-bin" in image.load_recipe().packages
    scripts = RECIPE / "rootfs/etc/initramfs-tools/scripts"
    for script in (scripts / "local-top/gcvm-verity", scripts / "local-bottom/gcvm-overlay"):
        assert script.stat().st_mode & 0o111  # initramfs-tools skips a script it cannot run
        subprocess.run(["sh", "-n", str(script)], check=True)


def test_verity_parameters_on_the_command_line() -> None:
    from orchestrator.image.model import guest_cmdline, verity_cmdline

    line = verity_cmdline("0f" * 32, 4096 * 300)
    assert line == f"gcvm.verity={'0f' * 32} gcvm.verity_offset={4096 * 300}"
    for bad in (("0F" * 32, 4096), ("0f" * 31, 4096), ("0f" * 32, 0), ("0f" * 32, 4097)):
        with pytest.raises(ValueError):
            verity_cmdline(*bad)
    # the image's line keeps its verity parameters once, whatever the orchestrator appends
    with pytest.raises(ValueError, match=r"gcvm\.verity "):
        guest_cmdline(f"{image.CMDLINE} {line}", f"gcvm.verity={'00' * 32}")
    verity = (RECIPE / "rootfs/etc/initramfs-tools/scripts/local-top/gcvm-verity").read_text()
    assert "gcvm.verity=*)" in verity and "gcvm.verity_offset=*)" in verity
    assert "root=/dev/mapper/gcvm-root ro " in image.CMDLINE


def test_seed_unit_runs_before_networkd_and_sshd() -> None:
    unit = (RECIPE / "rootfs/etc/systemd/system/gcvm-seed.service").read_text()
    before = next(line for line in unit.splitlines() if line.startswith("Before="))
    assert "systemd-networkd.service" in before and "ssh.service" in before
    assert "ExecStart=/usr/local/sbin/gcvm-seed" in unit
    sshd = (RECIPE / "rootfs/etc/ssh/sshd_config.d/gcvm.conf").read_text().splitlines()
    assert "PermitRootLogin prohibit-password" in sshd
    assert "PasswordAuthentication no" in sshd
    customize = (RECIPE / "customize.sh").read_text()
    assert "systemd-networkd-wait-online.service" in customize
    assert "rm -f /etc/ssh/ssh_host_*" in customize


def test_catch_all_dhcp_sorts_after_generated_and_seed_files() -> None:
    name = "99-gcvm-dhcp.network"
    assert (RECIPE / "rootfs/etc/systemd/network" / name).exists()
    from orchestrator.seed import NETWORK_FILE

    assert sorted([name, NETWORK_FILE, "90-enp1s0.network"]) == [
        NETWORK_FILE,
        "90-enp1s0.network",
        name,
    ]


# --- apt sources -------------------------------------------------------------------------------

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Enabled: no

Types: deb
URIs: https://deb.nodesource.example/node_20.x
Suites: nodistro
Components: main
"""


def test_parse_deb822() -> None:
    sources = image.parse_deb822(DEB822)
    assert sources == [
        image.AptSource(
            "http://mirror.example/debian",
            "bookworm",
            ("main", "contrib"),
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        ),
        image.AptSource(
            "http://mirror.example/debian",
            "bookworm-updates",
            ("main", "contrib"),
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        ),
        image.AptSource("https://deb.nodesource.example/node_20.x", "nodistro", ("main",)),
    ]
    assert sources[0].line() == (
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm main contrib"
    )


def test_parse_one_line_format() -> None:
    text = (
        "# comment\n"
        "deb http://mirror.example/debian bookworm main\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security "
        "bookworm-security main non-free-firmware # trailing\n"
        "deb https://packages.example/apt cloud-sdk-bookworm main\n"
    )
    assert image.parse_one_line(text) == [
        image.AptSource("http://mirror.example/debian", "bookworm", ("main",)),
        image.AptSource(
            "http://sec.example/debian-security",
            "bookworm-security",
            ("main", "non-free-firmware"),
            "/k.gpg",
        ),
        image.AptSource("https://packages.example/apt", "cloud-sdk-bookworm", ("main",)),
    ]


def test_debian_sources_keep_only_the_suite_family(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb https://packages.example/apt cloud-sdk-bookworm main\n")
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list.d" / "other.list.disabled").write_text("deb http://x.example y main\n")
    chosen = image.debian_sources(image.host_apt_sources(etc))
    assert [(s.uri, s.suite) for s in chosen] == [
        ("http://mirror.example/debian", "bookworm"),
        ("http://mirror.example/debian", "bookworm-updates"),
    ]


def test_debian_sources_refuse_a_host_without_debian() -> None:
    sources = [image.AptSource("http://x.example/ubuntu", "noble", ("main",))]
    with pytest.raises(HostUnsupported, match="no Debian 'bookworm' entry"):
        image.debian_sources(sources)


def test_this_hosts_sources_name_no_mirror_from_the_code() -> None:
    try:
        sources = image.debian_sources(image.host_apt_sources())
    except HostUnsupported:
        pytest.skip("this host has no Debian bookworm apt source")
    source_text = "".join(p.read_text() for p in Path(image.__file__).parent.rglob("*.py"))
    for source in sources:
        assert source.uri not in source_text


# --- kernel facts ------------------------------------------------------------------------------


def test_tee_guest_support_from_kernel_config() -> None:
    bookworm_like = (
        "# CONFIG_INTEL_TDX_GUEST is not set\nCONFIG_AMD_MEM_ENCRYPT=y\nCONFIG_SEV_GUEST=m\n"
    )
    assert image.tee_guest_support(bookworm_like) == {"tdx": False, "sev-snp": True}
    newer = "CONFIG_INTEL_TDX_GUEST=y\nCONFIG_AMD_MEM_ENCRYPT=y\n# CONFIG_SEV_GUEST is not set\n"
    # a TD without its guest driver and configfs-tsm gives no quote: not a usable TDX guest
    assert image.tee_guest_support(newer) == {"tdx": False, "sev-snp": False}
    backports_612 = (
        "CONFIG_INTEL_TDX_GUEST=y\nCONFIG_TDX_GUEST_DRIVER=m\nCONFIG_TSM_REPORTS=m\n"
        "CONFIG_AMD_MEM_ENCRYPT=y\nCONFIG_SEV_GUEST=m\n"
    )
    assert image.tee_guest_support(backports_612) == {"tdx": True, "sev-snp": True}
    assert image.tee_guest_support("") == {"tdx": False, "sev-snp": False}


# --- the cache ---------------------------------------------------------------------------------


def write_fake_build(root: Path, support: dict[str, bool]) -> None:
    """What a finished build leaves: the files and image.json (for find_image's parsing)."""
    root.mkdir(parents=True)
    for name in (image.DISK, image.KERNEL, image.INITRD, image.KERNEL_CONFIG):
        (root / name).write_bytes(b"x")
    (root / image.METADATA).write_text(
        json.dumps(
            {
                "disk": image.DISK,
                "kernel": image.KERNEL,
                "initrd": image.INITRD,
                "cmdline": image.CMDLINE,
                "python": image.GUEST_PYTHON,
                "recipe_hash": root.name,
                "size_bytes": 4,
                "built_seconds": 300.5,
                "kernel_version": "6.1.0-x-amd64",
                "tee_guest_support": support,
                "disk_format": "qcow2",
                "python_version": "3.11.2",
            }
        )
    )


def test_find_image_missing_says_how_to_build(cache: Path) -> None:
    with pytest.raises(ImageMissing) as info:
        image.find_image()
    assert info.value.hint == "run 'gcvm image build'"
    assert image.recipe_hash() in info.value.message


def test_find_image_reads_the_current_recipes_build(cache: Path) -> None:
    write_fake_build(cache / "0123456789abcdef", {"tdx": True, "sev-snp": True})  # stale recipe
    with pytest.raises(ImageMissing):
        image.find_image()
    write_fake_build(cache / image.recipe_hash(), {"tdx": False, "sev-snp": True})
    found = image.find_image()
    assert found.root == cache / image.recipe_hash()
    assert found.disk == found.root / "disk.qcow2"
    assert found.kernel == found.root / "vmlinuz"
    assert found.direct_boot
    assert found.cmdline.startswith("root=/dev/mapper/gcvm-root ro console=ttyS0")
    assert found.python == "/opt/gcvm/venv/bin/python"
    assert found.supports_tee_guest(Tee.tdx) is False
    assert found.supports_tee_guest(Tee.sev_snp) is True
    assert found.supports_tee_guest(Tee.none) is True


def test_tee_guest_problem_names_the_missing_options(cache: Path) -> None:
    write_fake_build(cache / image.recipe_hash(), {"tdx": False, "sev-snp": True})
    found = image.find_image()
    problem = image.tee_guest_problem(found, Tee.tdx)
    assert problem is not None
    assert "CONFIG_INTEL_TDX_GUEST" in problem and "6.1.0-x-amd64" in problem
    assert image.tee_guest_problem(found, Tee.sev_snp) is None
    assert image.tee_guest_problem(found, Tee.none) is None


def test_find_image_notices_a_lost_file(cache: Path) -> None:
    root = cache / image.recipe_hash()
    write_fake_build(root, {})
    (root / image.INITRD).unlink()
    with pytest.raises(ImageMissing, match=r"lacks initrd\.img"):
        image.find_image()


def test_build_needs_root(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostUnsupported, match="needs root"):
        image.build_image()


def test_build_returns_the_cached_image_without_root(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_build(cache / image.recipe_hash(), {"tdx": False, "sev-snp": True})
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert image.build_image().recipe_hash == image.recipe_hash()


def test_publish_replaces_an_old_build(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    final.mkdir()
    (final / "old").write_text("old")
    work = tmp_path / ".build-abc-1"
    work.mkdir()
    (work / "new").write_text("new")
    image._publish(work, final)
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]
    assert [p.name for p in final.iterdir()] == ["new"]


def test_clean_stale_removes_interrupted_builds(tmp_path: Path) -> None:
    (tmp_path / ".build-abc-99" / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "abc").mkdir()
    image._clean_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]


# --- user images -------------------------------------------------------------------------------

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed"
)


@needs_qemu_img
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_user_image_accepts_qcow2_and_raw(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cloud.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "64M"], check=True)
    if fmt == "raw":  # a raw disk must hold a partition table (an empty one is refused)
        with open(path, "r+b") as disk:
            disk.seek(510)
            disk.write(b"\x55\xaa")
    user = image.user_image(path)
    assert user.disk == path and user.disk_format == fmt
    assert user.kernel is None and user.initrd is None and not user.direct_boot
    assert user.recipe_hash == ""
    assert user.supports_tee_guest(Tee.tdx) is None  # unknown, not "no"


@needs_qemu_img
def test_user_image_refuses_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "64M"], check=True)
    with pytest.raises(UsageError, match="vmdk"):
        image.user_image(path)


def test_user_image_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        image.user_image(tmp_path / "nope.qcow2")


def test_build_records_the_boot_files_sha256(cache: Path) -> None:
    from orchestrator.image.build import _write_metadata, boot_file_digests

    root = cache / image.recipe_hash()
    write_fake_build(root, {"tdx": False, "sev-snp": True})
    (root / image.KERNEL).write_bytes(b"kernel bytes")
    digests = boot_file_digests(root)
    assert digests == {
        "vmlinuz": hashlib.sha256(b"kernel bytes").hexdigest(),
        "initrd.img": hashlib.sha256(b"x").hexdigest(),
    }
    found = dataclasses.replace(image.find_image(), files_sha256=digests)
    _write_metadata(found, root)
    assert image.find_image().files_sha256 == digests  # image.json carries the record


def test_guest_cmdline_is_the_images_then_the_pins() -> None:
    from orchestrator.image.model import guest_cmdline

    assert guest_cmdline(image.CMDLINE) == image.CMDLINE
    assert guest_cmdline("root=/dev/vda  rw ", " gcvm.owner_key=AA\tgcvm.broker_cert=BB") == (
        "root=/dev/vda rw gcvm.owner_key=AA gcvm.broker_cert=BB"
    )
    with pytest.raises(ValueError, match=r"gcvm\.owner_key appears twice"):
        guest_cmdline("root=/dev/vda gcvm.owner_key=AA", "gcvm.owner_key=BB")
    with pytest.raises(ValueError, match="control characters"):
        guest_cmdline("root=/dev/vda", "quiet\x00")


def test_kernel_pin_parses_one_line() -> None:
    from orchestrator.errors import GcvmError
    from orchestrator.image.pinned import parse_kernel_pin

    digest = "ab" * 32
    pin = parse_kernel_pin(
        f"# comment\nlinux-image-6.12.9-cloud-amd64 6.12.9-1~bpo12+1 x-bp {digest}\n"
    )
    assert pin.deb_name == "linux-image-6.12.9-cloud-amd64_6.12.9-1~bpo12+1_amd64.deb"
    for bad in ("", "linux-image-x 1 s", f"linux-image-x 1 s {digest}\nlinux-image-y 1 s {digest}",
                f"bash 1 s {digest}", f"linux-image-x 1 s {digest[:-1]}"):  # fmt: skip
        with pytest.raises(GcvmError):
            parse_kernel_pin(bad)


def test_a_cached_kernel_deb_is_used_without_apt(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hashlib

    from orchestrator.errors import GcvmError
    from orchestrator.image import pinned

    calls: list[list[str]] = []
    monkeypatch.setattr(pinned, "_run", lambda argv, *a, **k: calls.append(list(argv)))
    data = b"a kernel package"
    pin = pinned.KernelPin("linux-image-9.9-cloud-amd64", "9.9-1", "x-bp",
                           hashlib.sha256(data).hexdigest())  # fmt: skip
    pinned.debs_dir().mkdir(parents=True)
    (pinned.debs_dir() / pin.deb_name).write_bytes(data)
    log = tmp_path / "log"
    assert pinned.fetch_kernel(pin, [], log) == pinned.debs_dir() / pin.deb_name
    assert calls == []  # offline: nothing asked of apt
    # a cached file with another digest is fetched again, and apt's file must match too
    (pinned.debs_dir() / pin.deb_name).write_bytes(b"tampered")
    with pytest.raises(GcvmError, match="left no"):
        pinned.fetch_kernel(pin, [], log)
    assert [c[-1] for c in calls] == ["update", f"{pin.package}={pin.version}"]
