"""Boot gcvm's guest image once under QEMU/TCG, configured by its seed, and log in over SSH.

The root disk is attached read-only, as gcvm's domains attach it, and is a raw copy of the image
in which one byte of a file no boot reads (TAMPERED) is flipped: the one boot shows the
dm-verity root in use and that the changed file is refused, not read. A second, short boot
with a wrong root hash on the command line shows that the initrd refuses the disk outright.

Everything lives in a private network namespace made here: a bridge with an address, the VM's
tap, QEMU, and the SSH client (which trusts only the host key pinned from the seed). Outside CI
the test skips with the reason when the host cannot run it; with CI=true it fails instead, and a
missing image is built first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import image as image_mod
from orchestrator.errors import ImageMissing
from orchestrator.keys import generate_ed25519, write_keypair, write_known_hosts
from orchestrator.seed import SeedConfig, build_seed_iso

pytestmark = pytest.mark.vm

IN_CI = os.environ.get("CI", "").lower() == "true"
SUBNET_PREFIX = "10.213.7"
BRIDGE_ADDR = f"{SUBNET_PREFIX}.1"
VM_ADDR = f"{SUBNET_PREFIX}.10"
VM_MAC = "52:54:00:d5:07:0a"
BOOT_TIMEOUT_S = 420.0
TAMPERED = "/usr/share/common-licenses/GPL-3"  # flipped in the test's copy of the root disk
INTACT = "/usr/share/common-licenses/GPL-2"
# The CPU model gcvm's TCG domains use (orchestrator/tee: Nehalem without cx16, whose CMPXCHG16B
# emulation in QEMU 7.2 double-faults Linux 6.12)
TCG_CPU = "Nehalem,-cx16"


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI the host must be able to run this test."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_image() -> image_mod.Image:
    if os.geteuid() != 0:
        unavailable("needs root (network namespace, tap device)")
    for tool in ("qemu-system-x86_64", "qemu-img", "ip", "ssh"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (scripts/install-system-deps.sh)")
    try:
        return image_mod.find_image()
    except ImageMissing as exc:
        if not IN_CI:
            pytest.skip(f"{exc.message}; {exc.hint}")
    return image_mod.build_image()


def sh(*argv: str, timeout: float = 60) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout).stdout


@dataclass(frozen=True)
class Netns:
    name: str

    def run(
        self, *argv: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    ns = Netns(f"gcvm-imgtest-{secrets.token_hex(3)}")
    sh("ip", "netns", "add", ns.name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "link", "add", "br0", "type", "bridge")
        ns.run("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
        ns.run("ip", "link", "set", "br0", "up")
        ns.run("ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        ns.run("ip", "link", "set", "tap0", "master", "br0", "up")
        yield ns
    finally:
        for pid in subprocess.run(
            ["ip", "netns", "pids", ns.name], capture_output=True, text=True, check=False
        ).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", ns.name], check=False)
    assert ns.name not in sh("ip", "netns", "list")


def tampered_copy(image: image_mod.Image, raw: Path) -> int:
    """A raw copy of the image's disk with one byte of TAMPERED's first block flipped; returns
    the byte's offset."""
    sh("qemu-img", "convert", "-O", "raw", str(image.disk), str(raw), timeout=300)
    block_size = int(sh("debugfs", "-R", "stats", str(raw)).split("Block size:")[1].split()[0])
    block = int(sh("debugfs", "-R", f"bmap {TAMPERED} 0", str(raw)).strip().splitlines()[-1])
    assert block > 0
    offset = block * block_size + 100
    with raw.open("r+b") as disk:
        disk.seek(offset)
        byte = disk.read(1)
        disk.seek(offset)
        disk.write(bytes([byte[0] ^ 0x01]))
    return offset


def qemu_argv(image: image_mod.Image, console: Path, root: Path, cmdline: str) -> list[str]:
    """QEMU as gcvm's TCG domain runs it: q35, the TCG CPU model, the root disk read-only."""
    assert image.kernel is not None and image.initrd is not None
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        TCG_CPU,
        "-m",
        "2048",
        "-smp",
        "1",
        # q35 without QEMU's default devices (floppy, VGA, ...), as a libvirt domain has it.
        "-machine",
        "q35",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        "-drive",
        f"file={root},if=virtio,format=raw,readonly=on",
    ]


@dataclass(frozen=True)
class Guest:
    key: Path
    known_hosts: Path
    console: Path
    boot_seconds: float


def ssh_argv(guest_key: Path, known_hosts: Path, command: str) -> list[str]:
    return [
        "ssh",
        "-i",
        str(guest_key),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        f"root@{VM_ADDR}",
        command,
    ]


def wait_for_ssh(
    ns: Netns,
    key: Path,
    known_hosts: Path,
    qemu: subprocess.Popen[bytes],
    console: Path,
    start: float,
) -> float:
    while time.monotonic() - start < BOOT_TIMEOUT_S:
        if qemu.poll() is not None:
            pytest.fail(f"QEMU exited with {qemu.returncode}:\n{console.read_text()[-3000:]}")
        probe = ns.run(*ssh_argv(key, known_hosts, "true"), check=False, timeout=30)
        if probe.returncode == 0:
            return time.monotonic() - start
        time.sleep(1)
    pytest.fail(f"no SSH after {BOOT_TIMEOUT_S:.0f} s:\n{console.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def guest(
    guest_image: image_mod.Image, netns: Netns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    """One VM for the whole module."""
    tmp_path = tmp_path_factory.mktemp("guest")
    assert guest_image.kernel is not None and guest_image.initrd is not None
    client, host = generate_ed25519("gcvm-test client"), generate_ed25519("gcvm-test host")
    key, known_hosts = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    write_keypair(client, key)
    write_known_hosts(known_hosts, {VM_ADDR: host.public_openssh})
    seed = tmp_path / "seed.iso"
    build_seed_iso(
        SeedConfig(
            hostname="imgtest",
            authorized_keys=[client.public_openssh],
            host_key_private_pem=host.private_openssh,
            host_key_public=host.public_openssh,
            address=VM_ADDR,
            prefix=24,
            gateway=BRIDGE_ADDR,
            mac=VM_MAC,
        ),
        seed,
    )
    root = tmp_path / "root.raw"
    tampered_copy(guest_image, root)
    console = tmp_path / "console.log"
    argv = [
        "ip",
        "netns",
        "exec",
        netns.name,
        *qemu_argv(guest_image, console, root, guest_image.cmdline),
        "-drive",
        f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev",
        "tap,id=net0,ifname=tap0,script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={VM_MAC}",
    ]
    start = time.monotonic()
    qemu = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        seconds = wait_for_ssh(netns, key, known_hosts, qemu, console, start)
        print(f"\nboot to SSH (pinned host key): {seconds:.1f} s")
        yield Guest(key=key, known_hosts=known_hosts, console=console, boot_seconds=seconds)
    finally:
        qemu.terminate()
        try:
            qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()


def test_seeded_guest_boots_and_runs_torch(
    guest_image: image_mod.Image, netns: Netns, guest: Guest
) -> None:
    def remote(command: str, timeout: float = 60) -> str:
        return netns.run(
            *ssh_argv(guest.key, guest.known_hosts, command), timeout=timeout
        ).stdout.strip()

    print(remote("systemd-analyze || true"))  # kernel + userspace times, for the record
    assert remote("hostname") == "imgtest"
    assert remote("systemctl is-active gcvm-seed.service") == "active"
    # The static address came from the seed's networkd file, matched by MAC.
    assert f"inet {VM_ADDR}/24" in remote(f"ip -4 addr show to {VM_ADDR}/32")
    assert remote("grep -h PasswordAuthentication /etc/ssh/sshd_config.d/gcvm.conf") == (
        "PasswordAuthentication no"
    )
    # The image ships no host key of its own: only the seed's pair is there.
    assert remote("ls /etc/ssh/ | grep ^ssh_host_").split() == [
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
    ]
    assert remote("passwd -S root").split()[1] == "L"  # no root password
    start = time.monotonic()
    out = remote(
        f"{guest_image.python} -c 'import torch, tokenizers; print(torch.__version__)'",
        timeout=240,
    )
    print(f"import torch, tokenizers in the guest: {time.monotonic() - start:.1f} s")
    assert out.startswith("2.13.0")


def test_the_root_is_verified_read_only_with_writable_state_in_tmpfs(
    guest_image: image_mod.Image, netns: Netns, guest: Guest
) -> None:
    def remote(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.run(*ssh_argv(guest.key, guest.known_hosts, command), check=check)

    assert "gcvm.verity=" in guest_image.cmdline
    root_hash = guest_image.cmdline.split("gcvm.verity=")[1].split()[0]
    status = remote("veritysetup status gcvm-root").stdout
    print(status)
    assert "is active" in status and "/dev/vda" in status
    table = remote("dmsetup table gcvm-root").stdout
    assert " verity " in table and root_hash in table
    assert f"root hash {root_hash}" in guest.console.read_text()
    mounts = remote("findmnt -rn -o TARGET,FSTYPE,OPTIONS").stdout.splitlines()
    fstype = {line.split()[0]: line.split()[1:] for line in mounts}
    assert fstype["/"][0] == "overlay"
    assert fstype["/run/gcvm/ro"][0] == "ext4" and "ro" in fstype["/run/gcvm/ro"][1].split(",")
    assert fstype["/run/gcvm/rw"][0] == "tmpfs"
    assert remote("swapon --show --noheadings").stdout.strip() == ""
    # writable state lands in the tmpfs; the verified root below it is unchanged
    remote("mkdir -p /var/lib/gcvm/packages && echo x > /var/lib/gcvm/packages/probe")
    assert remote("cat /run/gcvm/rw/upper/var/lib/gcvm/packages/probe").stdout == "x\n"
    assert remote("test -e /run/gcvm/ro/var/lib/gcvm/packages/probe", check=False).returncode
    # the seed's files went to the tmpfs too (host key, authorized_keys)
    assert (
        remote("test -s /run/gcvm/rw/upper/etc/ssh/ssh_host_ed25519_key", check=False).returncode
        == 0
    )


def test_a_changed_byte_of_the_root_is_refused_not_read(netns: Netns, guest: Guest) -> None:
    def remote(command: str) -> subprocess.CompletedProcess[str]:
        return netns.run(*ssh_argv(guest.key, guest.known_hosts, command), check=False)

    assert remote(f"cat {INTACT} > /dev/null").returncode == 0
    read = remote(f"cat {TAMPERED} > /dev/null")
    assert read.returncode != 0 and "Input/output error" in read.stderr, read
    assert "is corrupted" in remote("dmesg | grep -i verity").stdout


REFUSALS = ("dm-verity refused the root disk", "refusing to boot")


def test_a_wrong_root_hash_is_refused_at_boot(guest_image: image_mod.Image, tmp_path: Path) -> None:
    """The same disk with another root hash on the command line: the initrd refuses it."""
    root_hash = guest_image.cmdline.split("gcvm.verity=")[1].split()[0]
    wrong = f"{int(root_hash[0], 16) ^ 1:x}{root_hash[1:]}"
    cmdline = guest_image.cmdline.replace(root_hash, wrong)
    root = tmp_path / "root.raw"
    sh("qemu-img", "convert", "-O", "raw", str(guest_image.disk), str(root), timeout=300)
    console = tmp_path / "console.log"
    qemu = subprocess.Popen(
        qemu_argv(guest_image, console, root, cmdline),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        start = time.monotonic()
        while time.monotonic() - start < BOOT_TIMEOUT_S and qemu.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if any(refusal in text for refusal in REFUSALS):
                break
            time.sleep(2)
        text = console.read_text(errors="replace")
        print(f"refused after {time.monotonic() - start:.1f} s")
        assert any(refusal in text for refusal in REFUSALS), text[-3000:]
        assert "gcvm-seed" not in text and "Welcome to" not in text  # no userspace started
    finally:
        qemu.kill()
        qemu.wait()


def test_a_wrong_host_key_is_refused(
    guest_image: image_mod.Image, netns: Netns, guest: Guest, tmp_path: Path
) -> None:
    impostor = tmp_path / "impostor_known_hosts"
    write_known_hosts(impostor, {VM_ADDR: generate_ed25519().public_openssh})
    probe = netns.run(*ssh_argv(guest.key, impostor, "true"), check=False)
    assert probe.returncode == 255
    assert "host key" in probe.stderr.lower()
