"""`RunSession`, the body every run verb shares: whatever way a run ends (an error, Ctrl-C), the
ranks it started are stopped first, then its broker, sampler and SSH connections, and the
cluster's lock is free again. Against the fakes of test_cluster: no daemon, no VM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cluster, runbroker, state
from orchestrator.errors import RemoteError
from orchestrator.run import session
from orchestrator.run.session import RunSession
from orchestrator.run.world import plan_world
from orchestrator.spec import ClusterSpec, Role
from tests.unit.test_cluster import FakeBackend
from tests.unit.test_failure_paths import FakeBroker, FakeRemote


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    yield FakeBackend(tmp_path)


class FakeSampler:
    def __init__(self) -> None:
        self.stops = 0

    def start(self) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        self.stops += 1
        return {}


class FakeHypervisor:
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("error", [KeyboardInterrupt, RemoteError])
def test_every_way_out_stops_ranks_then_releases_everything(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: type
) -> None:
    st = cluster.up(ClusterSpec(name="rs"), backend=backend)
    remotes = {vm.name: FakeRemote(vm.name, fail_mkdir=False) for vm in st.vms}
    monkeypatch.setattr(session, "connect_all", lambda _st, _names=None: remotes)
    broker = FakeBroker()
    monkeypatch.setattr(runbroker, "broker_for", lambda *_a: broker)
    sampler, hv = FakeSampler(), FakeHypervisor()
    monkeypatch.setattr(session, "open_sampler", lambda _st: (sampler, hv))
    with pytest.raises(error), RunSession("rs") as run:
        assert str(state.lock_path("rs")) in state._held  # the cluster's lock is held
        run.connect()
        run.start_broker([], None, tmp_path)
        run.sample().start()
        for node, rank in plan_world(run.st, 29500):
            run.start(node, rank.role, ["sleep", "1000"], {}, {})
        raise error("lost")
    procs = [p for r in remotes.values() for p in r.procs]
    assert procs and all(p.killed for p in procs)
    assert all(r.closed for r in remotes.values())
    assert broker.stopped and sampler.stops == 1 and hv.closed
    assert str(state.lock_path("rs")) not in state._held  # and free again
    cluster.down("rs", backend=backend)


def test_a_clean_run_leaves_its_ranks_and_releases_everything(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = cluster.up(ClusterSpec(name="rc"), backend=backend)
    remotes = {vm.name: FakeRemote(vm.name, fail_mkdir=False) for vm in st.vms}
    monkeypatch.setattr(session, "connect_all", lambda _st, _names=None: remotes)
    with RunSession("rc") as run:
        assert run.tee == "none" and run.hw is None and run.broker is None
        run.connect([vm.name for vm in st.vms if vm.role is Role.worker])
    assert all(r.closed for r in remotes.values())
    assert str(state.lock_path("rc")) not in state._held
    cluster.down("rc", backend=backend)


def test_a_failure_while_releasing_still_releases_the_rest(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    st = cluster.up(ClusterSpec(name="rf"), backend=backend)
    remotes = {vm.name: FakeRemote(vm.name, fail_mkdir=False) for vm in st.vms}
    monkeypatch.setattr(session, "connect_all", lambda _st, _names=None: remotes)
    broker = FakeBroker()

    def stop() -> None:
        raise RemoteError("the broker would not stop")

    broker.stop = stop  # type: ignore[method-assign]
    monkeypatch.setattr(runbroker, "broker_for", lambda *_a: broker)
    with pytest.raises(RemoteError, match="would not stop"), RunSession("rf") as run:
        run.connect()
        run.start_broker([], None, tmp_path)
    assert all(r.closed for r in remotes.values())
    assert str(state.lock_path("rf")) not in state._held
    cluster.down("rf", backend=backend)
