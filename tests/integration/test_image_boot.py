"""Boot gcvm's guest image once under QEMU/TCG, configured by its seed, and log in over SSH.

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
    overlay = tmp_path / "overlay.qcow2"
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        guest_image.disk_format,
        "-b",
        str(guest_image.disk),
        str(overlay),
    )
    console = tmp_path / "console.log"
    argv = [
        "ip",
        "netns",
        "exec",
        netns.name,
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "Nehalem",
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
        str(guest_image.kernel),
        "-initrd",
        str(guest_image.initrd),
        "-append",
        guest_image.cmdline,
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
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


def test_a_wrong_host_key_is_refused(
    guest_image: image_mod.Image, netns: Netns, guest: Guest, tmp_path: Path
) -> None:
    impostor = tmp_path / "impostor_known_hosts"
    write_known_hosts(impostor, {VM_ADDR: generate_ed25519().public_openssh})
    probe = netns.run(*ssh_argv(guest.key, impostor, "true"), check=False)
    assert probe.returncode == 255
    assert "host key" in probe.stderr.lower()
