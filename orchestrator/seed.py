"""The per-VM seed: a small ISO9660 volume labelled `cidata`, attached as a read-only disk.

It carries two views of the same configuration:
- `gcvm/*`: files for the image's own first-boot reader (`images/rootfs/usr/local/sbin/gcvm-seed`),
  copied into place before systemd-networkd and sshd start;
- `user-data`, `meta-data`, `network-config`: a cloud-init NoCloud seed with the same content, so a
  user's own cloud image (`--image PATH`) is configured by the same disk.
Rock Ridge and Joliet keep the long lowercase names; the ISO9660 names are only 8.3 placeholders.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from orchestrator.errors import UsageError
from orchestrator.keys import public_from_private, strip_comment

LABEL = "cidata"
GCVM_DIR = "gcvm"
NETWORK_FILE = "10-gcvm-seed.network"
HOST_KEY_FILE = "ssh_host_ed25519_key"
CLOUD_INIT_NIC = "gcvm0"  # what cloud-init names the cluster NIC in a user's image
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class SeedConfig:
    hostname: str
    authorized_keys: Sequence[str]
    host_key_private_pem: str  # OpenSSH private key of the VM (ed25519), unencrypted
    host_key_public: str  # its "ssh-ed25519 AAAA..." line: what gcvm pins
    address: str  # the VM's IPv4 address on the cluster network
    prefix: int
    gateway: str | None
    mac: str  # the cluster NIC's MAC: the static network file matches it
    dns: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "authorized_keys", tuple(self.authorized_keys))
        object.__setattr__(self, "dns", tuple(self.dns))
        object.__setattr__(self, "mac", self.mac.lower())
        self.validate()

    def validate(self) -> None:
        if not HOSTNAME_RE.match(self.hostname):
            raise UsageError(f"invalid VM hostname {self.hostname!r}")
        if not self.authorized_keys:
            raise UsageError("a seed needs at least one authorized key")
        for key in self.authorized_keys:
            if "\n" in key.strip() or len(key.split()) < 2:
                raise UsageError(f"not an OpenSSH public key: {key[:40]!r}")
        if public_from_private(self.host_key_private_pem) != strip_comment(self.host_key_public):
            raise UsageError(f"the host key of {self.hostname} does not match its public key")
        if not MAC_RE.match(self.mac):
            raise UsageError(f"invalid MAC address {self.mac!r}")
        if not 0 < self.prefix <= 32:
            raise UsageError(f"invalid prefix length {self.prefix}")
        for value in (self.address, self.gateway, *self.dns):
            if value is None:
                continue
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise UsageError(f"invalid IPv4 address {value!r}") from None
        if self.gateway is not None and ipaddress.IPv4Address(self.gateway) not in self.network:
            raise UsageError(f"gateway {self.gateway} is outside {self.network}")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.address}/{self.prefix}", strict=False)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix}"


def networkd_file(cfg: SeedConfig) -> str:
    """The static systemd-networkd file for the cluster NIC, matched by MAC."""
    lines = [
        "[Match]",
        f"MACAddress={cfg.mac}",
        "",
        "[Network]",
        f"Address={cfg.cidr}",
        *([f"Gateway={cfg.gateway}"] if cfg.gateway else []),
        *(f"DNS={server}" for server in cfg.dns),
        "LinkLocalAddressing=no",
        "IPv6AcceptRA=no",
    ]
    return "\n".join(lines) + "\n"


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def user_data(cfg: SeedConfig) -> str:
    """cloud-init user-data. Its schema rejects `users: []` and `ssh_genkeytypes: []`, and `locale`
    must be the string "false" on an image without locales."""
    config: dict[str, Any] = {
        "hostname": cfg.hostname,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "locale": "false",
        "users": [
            {
                "name": "root",
                "lock_passwd": True,
                "ssh_authorized_keys": list(cfg.authorized_keys),
            }
        ],
        "disable_root": False,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {
            "ed25519_private": cfg.host_key_private_pem,
            "ed25519_public": strip_comment(cfg.host_key_public),
        },
    }
    return "#cloud-config\n" + _yaml(config)


def network_config(cfg: SeedConfig) -> str:
    """cloud-init network-config, version 2 (no top-level `network:` key), matched by MAC.
    gcvm's own image ignores it (its reader matches by MAC and keeps the kernel's name)."""
    nic: dict[str, Any] = {
        "match": {"macaddress": cfg.mac},
        # Without set-name, cloud-init's ENI and networkd renderers configure an interface
        # named after the key, which does not exist; with it, every renderer agrees.
        "set-name": CLOUD_INIT_NIC,
        "addresses": [cfg.cidr],
        "dhcp4": False,
        "dhcp6": False,
    }
    if cfg.gateway:
        # cloud-init 22.4 (Debian 12) rejects netplan's `to: default`.
        nic["routes"] = [{"to": "0.0.0.0/0", "via": cfg.gateway}]
    if cfg.dns:
        nic["nameservers"] = {"addresses": list(cfg.dns)}
    return _yaml({"version": 2, "ethernets": {CLOUD_INIT_NIC: nic}})


def meta_data(cfg: SeedConfig) -> str:
    # A new instance-id whenever the content changes makes cloud-init apply it again.
    digest = hashlib.sha256((user_data(cfg) + network_config(cfg)).encode()).hexdigest()[:12]
    return _yaml({"instance-id": f"{cfg.hostname}-{digest}", "local-hostname": cfg.hostname})


def seed_files(cfg: SeedConfig) -> dict[str, tuple[bytes, int]]:
    """Every file of the seed: path inside the volume -> (content, mode)."""
    files: dict[str, tuple[str, int]] = {
        "meta-data": (meta_data(cfg), 0o444),
        "user-data": (user_data(cfg), 0o400),
        "network-config": (network_config(cfg), 0o444),
        f"{GCVM_DIR}/hostname": (cfg.hostname + "\n", 0o444),
        f"{GCVM_DIR}/authorized_keys": (
            "".join(k.strip() + "\n" for k in cfg.authorized_keys),
            0o444,
        ),
        f"{GCVM_DIR}/{HOST_KEY_FILE}": (cfg.host_key_private_pem, 0o400),
        f"{GCVM_DIR}/{HOST_KEY_FILE}.pub": (cfg.host_key_public.strip() + "\n", 0o444),
        f"{GCVM_DIR}/{NETWORK_FILE}": (networkd_file(cfg), 0o444),
    }
    if cfg.dns:
        resolv = "".join(f"nameserver {server}\n" for server in cfg.dns)
        files[f"{GCVM_DIR}/resolv.conf"] = (resolv, 0o444)
    return {path: (text.encode(), mode) for path, (text, mode) in files.items()}


def _iso_name(index: int, directory: bool) -> str:
    """A plain ISO9660 level-1 name; readers use the Rock Ridge / Joliet names instead."""
    return f"D{index:07d}" if directory else f"F{index:07d}.;1"


def build_seed_iso(cfg: SeedConfig, path: Path) -> None:
    """Write the seed volume to `path` (0600: it holds the VM's private host key)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    directories: dict[str, str] = {"": ""}
    for index, (name, (data, mode)) in enumerate(sorted(seed_files(cfg).items())):
        parent, _, base = name.rpartition("/")
        if parent not in directories:
            iso_dir = f"{directories['']}/{_iso_name(len(directories), directory=True)}"
            iso.add_directory(iso_dir, rr_name=parent, joliet_path=f"/{parent}")
            directories[parent] = iso_dir
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"{directories[parent]}/{_iso_name(index, directory=False)}",
            rr_name=base,
            joliet_path=f"/{name}",
            file_mode=0o100000 | mode,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            iso.write_fp(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        iso.close()
