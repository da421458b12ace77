"""A locked master's seed reader (images/rootfs/usr/local/sbin/gcvm-seed-locked), run for real
on seeds gcvm writes and on seeds a host could write instead: it takes a hostname and a static
address, parsed and written anew, and nothing else (no key, no other networkd setting)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import keys, seed

SCRIPT = Path(__file__).resolve().parents[2] / "images/rootfs/usr/local/sbin/gcvm-seed-locked"


def _seed_dir(tmp_path: Path, **change: str) -> Path:
    host_key = keys.generate_ed25519(comment="m0")
    cfg = seed.SeedConfig(hostname="lk-master0", authorized_keys=["ssh-ed25519 AAAAC3Nza host"],
                          host_key_private_pem=host_key.private_openssh,
                          host_key_public=host_key.public_openssh, address="10.9.0.11",
                          prefix=24, gateway="10.9.0.1", mac="52:54:00:aa:bb:cc",
                          dns=["10.9.0.1"])  # fmt: skip
    src = tmp_path / "seed"
    for name, (data, _mode) in seed.seed_files(cfg).items():
        if name.startswith(f"{seed.GCVM_DIR}/"):
            path = src / name.removeprefix(f"{seed.GCVM_DIR}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for name, text in change.items():
        (src / name).write_text(text)
    return src


def _run(src: Path, root: Path) -> subprocess.CompletedProcess[str]:
    (root / "etc" / "systemd" / "network").mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), str(src), str(root)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_gcvms_seed_gives_the_name_and_the_address_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = _run(_seed_dir(tmp_path), root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "etc/hostname").read_text() == "lk-master0\n"
    network = (root / "etc/systemd/network/10-gcvm-seed.network").read_text()
    assert "MACAddress=52:54:00:aa:bb:cc" in network and "Address=10.9.0.11/24" in network
    assert "Gateway=10.9.0.1" in network and "DNS=10.9.0.1" in network
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == ["etc/hostname", "etc/hosts", "etc/resolv.conf",
                       "etc/systemd/network/10-gcvm-seed.network"]  # fmt: skip
    assert "authorized_keys" in proc.stdout and "ssh_host_ed25519_key" in proc.stdout


@pytest.mark.parametrize(
    "change",
    [
        # networkd settings beyond a static address: routes, DHCP, another link, a netdev
        {
            "10-gcvm-seed.network": "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\n"
            "Address=10.9.0.11/24\nDHCP=yes\n"
        },
        {"10-gcvm-seed.network": "[Match]\nName=*\n[Network]\nAddress=10.9.0.11/24\n"},
        {
            "10-gcvm-seed.network": "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\n"
            "Address=10.9.0.11/24\n[Route]\nGateway=203.0.113.1\n"
        },
        {
            "10-gcvm-seed.network": "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\n"
            "Address=10.9.0.11/24\nGateway=203.0.113.1\n"
        },
        {
            "10-gcvm-seed.network": "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\n"
            "Address=10.9.0.11/24\nDNS=8.8.8.8 ; rm -rf /\n"
        },
        # a host name that is more than a name
        {"hostname": "m0\n127.0.0.1 broker.example\n"},
        {"hostname": "$(sh)"},
        {"hostname": "x" * 5000},
    ],
)
def test_a_host_written_seed_beyond_that_is_refused(tmp_path: Path, change: dict[str, str]) -> None:
    root = tmp_path / "root"
    proc = _run(_seed_dir(tmp_path, **change), root)
    assert proc.returncode != 0
    assert "the seed is refused" in proc.stdout
    assert not (root / "etc/systemd/network/10-gcvm-seed.network").exists()
    assert not (root / "etc/hostname").exists()
