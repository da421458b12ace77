"""The per-VM seed ISO: read back with pycdlib, every file checked under all three name schemes."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml

from orchestrator.errors import UsageError
from orchestrator.keys import generate_ed25519
from orchestrator.seed import SeedConfig, build_seed_iso, seed_files

HOST = generate_ed25519("vm-0 host key")
CLIENT = generate_ed25519("gcvm client")
OTHER = generate_ed25519("another client")


def config(**changes: object) -> SeedConfig:
    values: dict[str, object] = {
        "hostname": "gcvm-master-0",
        "authorized_keys": [CLIENT.public_openssh, OTHER.public_openssh],
        "host_key_private_pem": HOST.private_openssh,
        "host_key_public": HOST.public_openssh,
        "address": "192.168.122.10",
        "prefix": 24,
        "gateway": "192.168.122.1",
        "mac": "52:54:00:0A:7A:0A",
        "dns": ["192.168.122.1"],
    }
    values.update(changes)
    return SeedConfig(**values)  # type: ignore[arg-type]


def read_rr(iso: pycdlib.PyCdlib, path: str) -> bytes:
    buf = io.BytesIO()
    iso.get_file_from_iso_fp(buf, rr_path=path)
    return buf.getvalue()


def read_joliet(iso: pycdlib.PyCdlib, path: str) -> bytes:
    buf = io.BytesIO()
    iso.get_file_from_iso_fp(buf, joliet_path=path)
    return buf.getvalue()


@pytest.fixture
def iso_path(tmp_path: Path) -> Path:
    path = tmp_path / "vm" / "seed.iso"
    build_seed_iso(config(), path)
    return path


def test_every_file_reads_back_under_rock_ridge_and_joliet(iso_path: Path) -> None:
    expected = seed_files(config())
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        rr_names = {
            f"{root.rstrip('/')}/{name}".lstrip("/")
            for root, _dirs, files in iso.walk(rr_path="/")
            for name in files
        }
        assert rr_names == set(expected)
        for name, (data, mode) in expected.items():
            assert read_rr(iso, f"/{name}") == data, name
            assert read_joliet(iso, f"/{name}") == data, name
            record = iso.get_record(rr_path=f"/{name}")
            assert stat.S_IMODE(record.rock_ridge.get_file_mode()) == mode, name
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    finally:
        iso.close()
    assert stat.S_IMODE(iso_path.stat().st_mode) == 0o600


def test_first_boot_files(iso_path: Path) -> None:
    cfg = config()
    files = {name: data.decode() for name, (data, _mode) in seed_files(cfg).items()}
    assert files["gcvm/hostname"] == "gcvm-master-0\n"
    assert files["gcvm/authorized_keys"].splitlines() == [
        CLIENT.public_openssh,
        OTHER.public_openssh,
    ]
    assert files["gcvm/ssh_host_ed25519_key"] == HOST.private_openssh
    assert files["gcvm/ssh_host_ed25519_key.pub"] == HOST.public_openssh + "\n"
    assert files["gcvm/resolv.conf"] == "nameserver 192.168.122.1\n"
    network = files["gcvm/10-gcvm-seed.network"].splitlines()
    assert "MACAddress=52:54:00:0a:7a:0a" in network  # normalized to lowercase
    assert "Address=192.168.122.10/24" in network
    assert "Gateway=192.168.122.1" in network
    assert network.index("[Match]") < network.index("[Network]")


def test_cloud_init_files(iso_path: Path) -> None:
    files = {name: data.decode() for name, (data, _mode) in seed_files(config()).items()}
    assert files["user-data"].startswith("#cloud-config\n")
    user = yaml.safe_load(files["user-data"])
    assert user["hostname"] == "gcvm-master-0"
    assert user["locale"] == "false"  # a string: cloud-init's locale module fails otherwise
    assert user["users"] == [
        {
            "name": "root",
            "lock_passwd": True,
            "ssh_authorized_keys": [CLIENT.public_openssh, OTHER.public_openssh],
        }
    ]
    assert user["disable_root"] is False
    assert user["ssh_pwauth"] is False
    assert user["ssh_genkeytypes"] == ["ed25519"]
    assert user["ssh_keys"]["ed25519_private"] == HOST.private_openssh
    assert user["ssh_keys"]["ed25519_public"] == HOST.public_key
    network = yaml.safe_load(files["network-config"])
    assert "network" not in network
    assert network["version"] == 2
    nic = network["ethernets"]["gcvm0"]
    assert nic["match"] == {"macaddress": "52:54:00:0a:7a:0a"}
    assert nic["set-name"] == "gcvm0"
    assert nic["addresses"] == ["192.168.122.10/24"]
    assert nic["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.122.1"}]
    assert nic["nameservers"] == {"addresses": ["192.168.122.1"]}
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "gcvm-master-0"
    assert meta["instance-id"].startswith("gcvm-master-0-")


def test_instance_id_follows_the_content() -> None:
    def instance_id(cfg: SeedConfig) -> str:
        return yaml.safe_load(seed_files(cfg)["meta-data"][0])["instance-id"]

    assert instance_id(config()) == instance_id(config())
    assert instance_id(config()) != instance_id(config(address="192.168.122.11"))


def test_without_gateway_and_dns() -> None:
    files = seed_files(config(gateway=None, dns=[]))
    assert "gcvm/resolv.conf" not in files
    assert b"Gateway" not in files["gcvm/10-gcvm-seed.network"][0]
    nic = next(iter(yaml.safe_load(files["network-config"][0])["ethernets"].values()))
    assert "routes" not in nic and "nameservers" not in nic


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hostname": "Bad_Name"}, "hostname"),
        ({"authorized_keys": []}, "authorized key"),
        ({"host_key_public": OTHER.public_openssh}, "does not match"),
        ({"mac": "52:54:00:0a:7a"}, "MAC"),
        ({"prefix": 33}, "prefix"),
        ({"address": "192.168.122.300"}, "IPv4"),
        ({"gateway": "10.0.0.1"}, "outside"),
    ],
)
def test_invalid_configs_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config(**change)


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid (util-linux) is not installed")
def test_blkid_sees_the_cidata_label(iso_path: Path) -> None:
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", str(iso_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "LABEL=cidata" in out.splitlines()
    assert "TYPE=iso9660" in out.splitlines()


def test_cloud_init_accepts_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cloud-init's own schema and network parser (Debian 12's 22.4: `dpkg -x` its package and
    point GCVM_CLOUDINIT_PATH at usr/lib/python3/dist-packages)."""
    if path := os.environ.get("GCVM_CLOUDINIT_PATH"):
        monkeypatch.syspath_prepend(path)
    reason = (
        "cloud-init is not importable: set GCVM_CLOUDINIT_PATH to the dist-packages of an "
        "unpacked cloud-init package (dpkg -x), with jsonschema, requests and configobj installed"
    )
    schema_mod = pytest.importorskip("cloudinit.config.schema", reason=reason)
    network_state = pytest.importorskip("cloudinit.net.network_state", reason=reason)
    files = seed_files(config())
    user_data = tmp_path / "user-data"
    user_data.write_bytes(files["user-data"][0])
    schema_mod.validate_cloudconfig_file(str(user_data), schema_mod.get_schema())
    state = network_state.parse_net_config_data(yaml.safe_load(files["network-config"][0]))
    (nic,) = state.iter_interfaces()
    assert (nic["name"], nic["mac_address"]) == ("gcvm0", "52:54:00:0a:7a:0a")
    (subnet,) = nic["subnets"]
    assert (subnet["type"], subnet["address"], subnet["prefix"]) == ("static", "192.168.122.10", 24)
    assert subnet["routes"] == [
        {"gateway": "192.168.122.1", "network": "0.0.0.0", "prefix": 0, "netmask": "0.0.0.0"}
    ]
    assert subnet["dns_nameservers"] == ["192.168.122.1"]
