"""The cluster's key broker (`gcvm up --broker`): a real `gcvm broker serve` process on loopback,
its key repository (keys added while it runs), its decisions file, and its stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from groupcover.keyrelease import KbsClient, KeyReleaseRefused, NoEvidence
from orchestrator import clusterbroker
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from orchestrator.errors import UsageError
from orchestrator.spec import ClusterSpec, Tee

KEY = bytes(range(32))


def test_a_broker_process_serves_keys_added_while_it_runs(tmp_path: Path) -> None:
    b = clusterbroker.ClusterBrokerState(owner=str(tmp_path / "owner"), address="127.0.0.1",
                                         netns=None, policy=None)  # fmt: skip
    b = clusterbroker.start(b)
    try:
        assert clusterbroker.alive(b) and b.url and b.url.startswith("http://127.0.0.1:")
        key_file = tmp_path / "k.key"
        key_file.write_bytes(KEY)
        with pytest.raises(KeyReleaseRefused, match="no resource"):
            KbsClient(b.url, NoEvidence(), timeout=10).get_resource("gcvm/abc/key")
        served = clusterbroker.install_key(b, "gcvm/abc/key", key_file)
        assert served.stat().st_mode & 0o777 == 0o600
        release = KbsClient(b.url, NoEvidence(), timeout=10).get_resource("gcvm/abc/key")
        assert release.secret == KEY and not release.attested
        decisions = clusterbroker.decisions_since(b, 0)
        assert [d["outcome"] for d in decisions if d["step"] == "resource"] == [
            "refused",
            "released",
        ]
        assert all(d["peer"] == "127.0.0.1" for d in decisions)
    finally:
        assert clusterbroker.stop(b)
    assert not clusterbroker.alive(b)
    assert not clusterbroker.stop(b)  # safe to repeat
    clusterbroker.remove_repository(b)
    assert not b.repository.exists() and b.log.exists()


def test_the_repository_serves_only_its_own_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "gcvm" / "x").mkdir(parents=True)
    (repo / "gcvm" / "x" / "key").write_bytes(KEY)
    (repo / "gcvm" / "x" / "key").chmod(0o600)
    (tmp_path / "secret").write_bytes(b"not a resource")
    os.symlink(tmp_path / "secret", repo / "gcvm" / "x" / "link")
    broker = Broker(parse_policy({}, tmp_path), insecure_no_attestation=True, repository=repo)
    assert broker._from_repository("gcvm/x/key") == repo.resolve() / "gcvm" / "x" / "key"
    for name in ("gcvm/x/link", "gcvm/../secret", "../secret/x/y", "gcvm/x", "gcvm/x/none",
                 "gcvm/x/.hidden", "a/b/c/d"):  # fmt: skip
        assert broker._from_repository(name) is None, name
    server = serve_in_thread(broker, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert KbsClient(url, NoEvidence()).get_resource("gcvm/x/key").secret == KEY
        with pytest.raises(KeyReleaseRefused, match="no resource"):
            KbsClient(url, NoEvidence()).get_resource("gcvm/x/link")
    finally:
        server.shutdown()
        server.server_close()


def test_a_broker_that_cannot_start_is_a_one_line_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    b = clusterbroker.ClusterBrokerState(owner=str(tmp_path / "o"), address="127.0.0.1",
                                         netns=None, policy=missing)  # fmt: skip
    with pytest.raises(clusterbroker.BrokerError, match="exited with status"):
        clusterbroker.start(b, timeout=60)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"broker_policy": "p.yaml"}, "--policy is for the cluster's broker"),
    ({"broker": True, "tee": Tee.tdx}, "the broker needs a policy file"),
    ({"broker": True, "broker_policy": "/nonexistent.yaml"}, "no such file"),
    ({"broker": True, "connect": "qemu:///system"}, "--broker with --connect"),
])  # fmt: skip
def test_broker_flags_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ClusterSpec(name="b", **kwargs)
