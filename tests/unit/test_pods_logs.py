"""`gcvm logs NODE` on a pods cluster: the pod's container log through podman, found by the
pod's name, its short name or its rank; an unknown pod is one line naming the pods there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.pods import lifecycle


class FakePodman:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> Any:
        self.calls.append(args)
        return subprocess.CompletedProcess(["podman", *args], 0, "rank 0 ready\n", "")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePodman:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    record = {"name": "pl", "netns": "gcvm-pl", "phase": "ready", "pods": [
        {"name": "pl-master0", "role": "master", "rank": 0, "address": "10.1.0.10"},
        {"name": "pl-worker0", "role": "worker", "rank": 1, "address": "10.1.0.11"}]}  # fmt: skip
    path = lifecycle.record_path("pl")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    fake = FakePodman()
    monkeypatch.setattr(lifecycle, "podman_for", lambda name, rec: fake)
    return fake


def test_a_pods_log_by_name_short_name_or_rank(cluster: FakePodman) -> None:
    for node in ("pl-worker0", "worker0", "1"):
        assert lifecycle.pod_log("pl", node) == "rank 0 ready\n"
    assert cluster.calls == [("logs", "pl-worker0-worker")] * 3


def test_an_unknown_pod_names_the_pods_there(cluster: FakePodman) -> None:
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match="no pod 'worker7'") as caught:
        lifecycle.pod_log("pl", "worker7")
    assert caught.value.hint == "its pods: master0, worker0"


def test_gcvm_logs_of_a_pods_cluster_that_does_not_exist(tmp_path: Path) -> None:
    env = {"GCVM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "orchestrator", "logs", "master0", "--name", "nosuch"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
