"""Model key files on disk: nobody but their owner may read or write one.

The key-release client writes its `--out` as a new 0600 file renamed into place (an existing
world-readable file is replaced, a symlink is replaced and never followed); `read_key` refuses a
key file that group or others may read or write, or that another user owns; the broker refuses to
start with such a file as a policy resource, and refuses to release one found in its repository
at request time (403, logged with the reason).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from groupcover.errors import PackageError
from groupcover.keyrelease import KbsClient, KeyReleaseRefused, NoEvidence, cli
from groupcover.keyrelease.kbs import Release
from groupcover.package.keys import read_key
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from orchestrator.errors import UsageError

KEY = bytes(range(32))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- the key-release client's --out -------------------------------------------------------


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's broker answers KEY (no network)."""

    class Fake:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def get_resource(self, name: str) -> Release:
            return Release(KEY, attested=False, tee="none", claims={}, seconds=0.0)

    monkeypatch.setattr(cli, "KbsClient", Fake)
    monkeypatch.setattr(cli, "detect", lambda tee: NoEvidence())


def _release(out: Path) -> int:
    return cli.main(["--broker", "http://127.0.0.1:1", "--tee", "none", "--out", str(out)])


def test_out_over_a_world_readable_file_leaves_a_0600_file(tmp_path: Path, released) -> None:
    out = tmp_path / "model.key"
    out.write_bytes(b"old")
    out.chmod(0o644)
    assert _release(out) == 0
    assert out.read_bytes() == KEY and _mode(out) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.key"]  # no temporary left


def test_out_never_follows_a_symlink(tmp_path: Path, released) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"the owner's file")
    victim.chmod(0o644)
    out = tmp_path / "model.key"
    out.symlink_to(victim)
    assert _release(out) == 0
    assert victim.read_bytes() == b"the owner's file" and _mode(victim) == 0o644
    assert not out.is_symlink() and out.read_bytes() == KEY and _mode(out) == 0o600


def test_out_in_a_missing_folder_is_one_line(tmp_path: Path, released, capsys) -> None:
    with pytest.raises(SystemExit) as info:  # refused as the command line is read, before any work
        _release(tmp_path / "none" / "model.key")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "there is no folder" in err and "Traceback" not in err


# ---- read_key -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660], ids=oct)
def test_read_key_refuses_a_key_others_may_read_or_write(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "model.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    with pytest.raises(PackageError, match=f"mode {mode:04o}") as info:
        read_key(path)
    assert "\n" not in str(info.value) and info.value.hint == f"chmod 600 {path}"


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=oct)
def test_read_key_reads_an_owner_only_key(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "model.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    assert read_key(path) == KEY


def test_read_key_refuses_a_key_another_user_owns(tmp_path: Path) -> None:
    """A 0600 key of another (non-root) user: its owner may change it under this process."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = tmp_path / "model.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    os.chown(path, 4242, -1)
    with pytest.raises(PackageError, match="owned by uid 4242"):
        read_key(path)


def test_read_key_reads_a_root_owned_key_as_root_or_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "model.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    assert path.stat().st_uid in (0, os.geteuid()) and read_key(path) == KEY


# ---- the broker -------------------------------------------------------------------------------


def test_the_broker_refuses_to_start_with_a_world_readable_policy_resource(tmp_path) -> None:
    (tmp_path / "model.key").write_bytes(KEY)
    (tmp_path / "model.key").chmod(0o644)
    policy = parse_policy({"resources": {"gcvm/model/key": "model.key"}}, tmp_path)
    with pytest.raises(UsageError, match=r"mode 0644.*chmod 600|readable"):
        Broker(policy, insecure_no_attestation=True)


def test_the_broker_refuses_to_release_a_world_readable_repository_key(tmp_path, caplog) -> None:
    repo = tmp_path / "repo"
    (repo / "gcvm" / "x").mkdir(parents=True)
    key = repo / "gcvm" / "x" / "key"
    key.write_bytes(KEY)
    key.chmod(0o644)
    broker = Broker(parse_policy({}, tmp_path), insecure_no_attestation=True, repository=repo)
    server = serve_in_thread(broker, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(KeyReleaseRefused, match="not released"):
            KbsClient(url, NoEvidence(), timeout=10).get_resource("gcvm/x/key")
        assert [d["outcome"] for d in broker.decisions if d["step"] == "resource"] == ["refused"]
        assert any("chmod 600" in r.getMessage() for r in caplog.records)
        key.chmod(0o600)
        assert KbsClient(url, NoEvidence(), timeout=10).get_resource("gcvm/x/key").secret == KEY
    finally:
        server.shutdown()
        server.server_close()


def test_a_given_package_key_others_can_read_is_refused_before_the_run(tmp_path: Path) -> None:
    """`gcvm run bench --model DIR`: the broker would refuse the key; say so before any VM."""
    from orchestrator.packages import load_package

    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": 1, "package_id": "x", "modes": []}')
    for name in ("published.safetensors", "master.sealed"):
        (folder / name).write_bytes(b"")
    (folder / "model.key").write_bytes(KEY)
    (folder / "model.key").chmod(0o644)
    with pytest.raises(UsageError, match="mode 0644") as info:
        load_package(folder)
    assert info.value.hint == f"chmod 600 {folder / 'model.key'}"
    (folder / "model.key").chmod(0o600)
    assert load_package(folder).key == folder / "model.key"
