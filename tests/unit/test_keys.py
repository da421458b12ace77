"""SSH keys: generation, OpenSSH formats, pinned known_hosts, 0600 files."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import paramiko
import pytest

from orchestrator import keys
from orchestrator.errors import UsageError


def test_generate_is_ed25519_and_loadable_by_paramiko(tmp_path: Path) -> None:
    pair = keys.generate_ed25519("vm-0")
    assert pair.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pair.public_openssh.startswith("ssh-ed25519 ")
    assert pair.public_openssh.endswith(" vm-0")
    path = tmp_path / "id"
    keys.write_keypair(pair, path)
    loaded = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert f"{loaded.get_name()} {loaded.get_base64()}" == pair.public_key


def test_two_keys_differ() -> None:
    assert keys.generate_ed25519().public_key != keys.generate_ed25519().public_key


def test_public_from_private_matches() -> None:
    pair = keys.generate_ed25519()
    assert keys.public_from_private(pair.private_openssh) == pair.public_key


def test_public_from_private_rejects_garbage() -> None:
    with pytest.raises(UsageError):
        keys.public_from_private("not a key")


def test_written_files_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "id_ed25519"
    keys.write_keypair(keys.generate_ed25519(), path)
    for item in (path, path.with_name("id_ed25519.pub")):
        assert stat.S_IMODE(item.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_ensure_keypair_generates_once(tmp_path: Path) -> None:
    path = tmp_path / "client"
    first = keys.ensure_keypair(path, "cluster")
    second = keys.ensure_keypair(path, "cluster")
    assert first == second


def test_load_keypair_detects_a_foreign_public_key(tmp_path: Path) -> None:
    path = tmp_path / "id"
    keys.write_keypair(keys.generate_ed25519(), path)
    path.with_name("id.pub").write_text(keys.generate_ed25519().public_openssh)
    with pytest.raises(UsageError, match="does not belong"):
        keys.load_keypair(path)


def test_known_hosts_lines(tmp_path: Path) -> None:
    pair = keys.generate_ed25519("comment-dropped")
    assert keys.known_hosts_line(["10.0.0.5", "vm-0"], pair.public_openssh) == (
        f"10.0.0.5,vm-0 {pair.public_key}"
    )
    assert keys.known_hosts_line(["10.0.0.5"], pair.public_openssh, port=2222).startswith(
        "[10.0.0.5]:2222 ssh-ed25519 "
    )
    path = tmp_path / "known_hosts"
    other = keys.generate_ed25519()
    keys.write_known_hosts(path, {"10.0.0.6": other.public_openssh, "10.0.0.5": pair.public_key})
    lines = path.read_text().splitlines()
    assert lines == [f"10.0.0.5 {pair.public_key}", f"10.0.0.6 {other.public_key}"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # paramiko reads the file as a pinned host key store.
    host_keys = paramiko.HostKeys(str(path))
    assert host_keys.lookup("10.0.0.5")["ssh-ed25519"].get_base64() == pair.public_key.split()[1]


def test_strip_comment_rejects_other_types() -> None:
    with pytest.raises(UsageError):
        keys.strip_comment("ssh-rsa AAAAB3NzaC1yc2E")
    with pytest.raises(UsageError):
        keys.strip_comment("ssh-ed25519 not*base64")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    pair = keys.generate_ed25519()
    path = tmp_path / "id"
    keys.write_keypair(pair, path)
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path.with_name("id.pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[1] == keys.fingerprint(pair.public_openssh)
    # ssh-keygen accepts the private key file as written (0600, OpenSSH format).
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert derived.split()[:2] == pair.public_key.split()
