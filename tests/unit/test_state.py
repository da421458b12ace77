"""The state file: JSON round trip, atomic save, a precise error when absent, and the lock."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from orchestrator import state
from orchestrator.errors import ClusterNotFound
from orchestrator.spec import Tee
from orchestrator.state import ClusterBusy, ClusterState, VmState


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    return tmp_path


def _state(name: str = "c1") -> ClusterState:
    d = state.cluster_dir(name)
    return ClusterState(
        name=name,
        spec={"name": name, "tee": "none", "workers": 1},
        uri="qemu:///system",
        netns=f"gcvm-{name}",
        network=f"gcvm-{name}",
        own_network=True,
        client_key=d / "ssh" / "id_ed25519",
        known_hosts=d / "ssh" / "known_hosts",
        private_daemon={"libvirtd_pid": 10, "virtlogd_pid": 11},
        image={"python": "/p"},
        host={"accel": "tcg", "qemu": "7.2.0"},
        vms=[
            VmState(
                name=f"{name}-master0",
                role="master",
                rank=0,
                index=0,
                address="192.168.122.10",
                mac="52:54:00:a8:7a:0a",
                tee=Tee.none,
                vcpus=1,
                memory_mib=2048,
                ifname="enp1s0",
                tee_verified="none",
            ),
            VmState(
                name=f"{name}-worker0",
                role="worker",
                rank=1,
                index=0,
                address="192.168.122.11",
                mac="52:54:00:a8:7a:0b",
                tee=Tee.sev_snp,
                vcpus=2,
                memory_mib=4096,
            ),
        ],
        phase="ready",
    )


def test_round_trip() -> None:
    st = _state()
    path = state.save(st)
    assert path == state.cluster_dir("c1") / "state.json"
    loaded = state.load("c1")
    assert loaded == st
    assert loaded.vms[1].tee is Tee.sev_snp
    assert isinstance(loaded.client_key, Path)
    assert state.exists("c1") and state.names() == ["c1"]
    assert not list(path.parent.glob("*.tmp*"))


def test_vm_lookup_by_name_short_name_and_rank() -> None:
    st = _state()
    assert st.vm("c1-worker0") is st.vms[1]
    assert st.vm("worker0") is st.vms[1]
    assert st.vm("0") is st.vms[0]
    with pytest.raises(state.GcvmError, match="no VM"):
        st.vm("worker7")


def test_missing_cluster_has_a_hint() -> None:
    with pytest.raises(ClusterNotFound) as err:
        state.load("nope")
    assert "gcvm up" in (err.value.hint or "")
    state.save(_state("other"))
    with pytest.raises(ClusterNotFound) as err:
        state.load("nope")
    assert "other" in (err.value.hint or "")


def test_corrupt_state_is_a_gcvm_error() -> None:
    path = state.state_path("bad")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(state.StateCorrupt) as err:
        state.load("bad")
    assert "gcvm down --name bad" in (err.value.hint or "")


def _hold(home: str, name: str, seconds: float, ready: object) -> None:
    import os

    os.environ["GCVM_HOME"] = home
    with state.locked(name):
        ready.set()  # type: ignore[attr-defined]
        time.sleep(seconds)


def test_lock_excludes_other_processes(home: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(home), "c1", 1.5, ready))
    proc.start()
    try:
        assert ready.wait(10)
        start = time.monotonic()
        with pytest.raises(ClusterBusy), state.locked("c1", wait=0.3):
            pass
        assert time.monotonic() - start < 2
        with state.locked("c2", wait=0.3):  # other clusters are independent
            pass
        with state.locked("c1", wait=10):  # waits for the holder to finish
            assert not proc.is_alive() or time.monotonic() - start >= 1.0
    finally:
        proc.join(10)


def test_lock_is_reentrant_in_one_process() -> None:
    with state.locked("c1"), state.locked("c1", wait=0):
        state.save(_state())
    assert state.load("c1").name == "c1"


def test_lock_file_is_removed_when_no_cluster_is_left(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    with state.locked("ghost"):
        assert state.lock_path("ghost").exists()
    assert not state.lock_path("ghost").exists()
    state.cluster_dir("kept").mkdir(parents=True)
    with state.locked("kept"):
        pass
    assert state.lock_path("kept").exists()
    with state.locked("kept"):  # a lock file left by an earlier command is reused
        pass
