"""SSH keys that gcvm generates: a client key pair per cluster and a host key per VM (ed25519).

gcvm writes each VM's host key into that VM's seed and pins the public half in a per-cluster
known_hosts file, so the first SSH connection already verifies the VM (no trust on first use).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator.errors import UsageError

ED25519 = "ssh-ed25519"


@dataclass(frozen=True)
class KeyPair:
    private_openssh: str  # "-----BEGIN OPENSSH PRIVATE KEY-----..." (unencrypted)
    public_openssh: str  # "ssh-ed25519 AAAA... comment"

    @property
    def public_key(self) -> str:
        """The public key without its comment: "ssh-ed25519 AAAA...", as known_hosts holds it."""
        return strip_comment(self.public_openssh)


def generate_ed25519(comment: str = "gcvm") -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return KeyPair(private_openssh=private, public_openssh=f"{public} {comment}".rstrip())


def public_from_private(private_openssh: str) -> str:
    """The "ssh-ed25519 AAAA..." public key of an OpenSSH private key (ed25519 only)."""
    try:
        key = serialization.load_ssh_private_key(private_openssh.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError("gcvm uses ed25519 keys only")
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def strip_comment(public_openssh: str) -> str:
    parts = public_openssh.split()
    if len(parts) < 2 or parts[0] != ED25519:
        raise UsageError(f"not an ed25519 public key: {public_openssh[:40]!r}")
    try:
        base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise UsageError(f"not an ed25519 public key: {public_openssh[:40]!r}") from None
    return f"{parts[0]} {parts[1]}"


def fingerprint(public_openssh: str) -> str:
    """The SHA256 fingerprint as `ssh-keygen -lf` prints it ("SHA256:...")."""
    blob = base64.b64decode(strip_comment(public_openssh).split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def write_secret(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write `data` atomically; the file never exists with a wider mode than `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ExposedSecret(UsageError):
    """A secret file (a model key the broker would release) that group or others may read or
    write: it is no longer only the owner's, so it is not used."""


def exposed(info: os.stat_result) -> str | None:
    """Why a file with this stat may not hold a secret (group or others may read or write it),
    or None."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return f"readable or writable by group or others (mode {mode:04o})"
    return None


def check_private(path: Path) -> None:
    """Refuses (`ExposedSecret`, a hint to `chmod 600`) a secret file others may read or write."""
    why = exposed(path.stat())
    if why is not None:
        raise ExposedSecret(f"{path} is {why}", hint=f"chmod 600 {path}")


def write_keypair(pair: KeyPair, path: Path) -> None:
    """The private key at `path` (0600) and the public key at `path`.pub (0600 too)."""
    write_secret(path, pair.private_openssh)
    write_secret(path.with_name(path.name + ".pub"), pair.public_openssh + "\n")


def load_keypair(path: Path) -> KeyPair:
    private = path.read_text()
    pub_path = path.with_name(path.name + ".pub")
    public = pub_path.read_text().strip() if pub_path.exists() else public_from_private(private)
    if strip_comment(public) != public_from_private(private):
        raise UsageError(f"{pub_path} does not belong to {path}")
    return KeyPair(private_openssh=private, public_openssh=public)


def ensure_keypair(path: Path, comment: str = "gcvm") -> KeyPair:
    """Load the key pair at `path`, or generate and write one (the per-cluster client key)."""
    if path.exists():
        return load_keypair(path)
    pair = generate_ed25519(comment)
    write_keypair(pair, path)
    return pair


def known_hosts_line(hosts: Sequence[str], public_openssh: str, port: int = 22) -> str:
    """One known_hosts line pinning `public_openssh` for every name/address in `hosts`."""
    if not hosts:
        raise UsageError("a known_hosts line needs at least one host")
    names = [host if port == 22 else f"[{host}]:{port}" for host in hosts]
    return f"{','.join(names)} {strip_comment(public_openssh)}"


def write_known_hosts(path: Path, entries: Mapping[str, str], port: int = 22) -> None:
    """A known_hosts file with one line per host: `entries` maps address -> public key."""
    lines = [known_hosts_line([host], key, port) for host, key in sorted(entries.items())]
    write_secret(path, "".join(line + "\n" for line in lines))
