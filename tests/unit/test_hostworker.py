"""The host worker (`gcvm up --worker host`) without a daemon or a VM: its spec, its
record in the state, the ranks of a run, `up`/`down` against the fake backend (recorded, rolled
back, stopped), the real supervisor process and its jobs, and `gcvm status`'s rendering."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import cluster, hostworker, state
from orchestrator.cli import format_uptime, status_renderables
from orchestrator.errors import GcvmError, Timeout, UsageError
from orchestrator.run import world as run_world
from orchestrator.spec import ClusterSpec, Role, plan_vms
from tests.unit.test_cluster import FakeBackend


def _hw(tmp: Path, **kw: object) -> hostworker.HostWorkerState:
    values: dict[str, object] = dict(
        name="hw-worker-host", rank=1, address="192.168.130.1", ifname="virbr0",
        python=sys.executable, root=str(Path(__file__).resolve().parents[2]), threads=1,
        dir=str(tmp / "worker-host"), log=str(tmp / "logs" / "worker-host.log"),
    )  # fmt: skip
    values.update(kw)
    return hostworker.HostWorkerState(**values)  # type: ignore[arg-type]


class HostBackend(FakeBackend):
    """The fake backend, with the host worker recorded instead of started."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.started: list[hostworker.HostWorkerState] = []
        self.stopped: list[hostworker.HostWorkerState | None] = []
        self.fail_start = False

    def start_host_worker(self, hw: hostworker.HostWorkerState) -> hostworker.HostWorkerState:
        assert state.load(hw.name.removesuffix("-worker-host")).host_worker == hw.to_dict()
        if self.fail_start:
            raise GcvmError("the host worker exited with status 1 before it was ready")
        self.started.append(hw)
        return replace(hw, pid=4242, started=time.time(), device="cpu", device_name="x86_64",
                       torch="2.13.0")  # fmt: skip

    def stop_host_worker(self, hw: hostworker.HostWorkerState | None, control: Path) -> bool:
        self.stopped.append(hw)
        return hw is not None

    def host_worker_alive(self, hw: hostworker.HostWorkerState) -> bool:
        return hw.pid == 4242 and self.stopped == []


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostBackend:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    return HostBackend(tmp_path)


# --- the spec ------------------------------------------------------------------------------------


def test_spec_with_a_host_worker_plans_master_vms_only(tmp_path: Path) -> None:
    spec = ClusterSpec(name="hw", masters=2, workers=0, worker_host=True)
    vms = plan_vms(spec, tmp_path)
    assert [(vm.name, vm.role, vm.rank) for vm in vms] == [
        ("hw-master0", Role.master, 0), ("hw-master1", Role.master, 1),
    ]  # fmt: skip
    assert spec.tees == (spec.tee,)
    assert spec.host_threads(16) == 14  # the host's CPUs less the masters' vCPUs
    assert spec.host_threads(2) == 1  # at least one
    assert replace(spec, worker_threads=3).host_threads(2) == 3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"workers": 1}, "--worker host with --workers 1: the host runs the one worker"),
        ({"worker_tee": "none"}, "has no TEE"),
        ({"worker_threads": 0}, "--worker-threads 0 is out of range"),
        ({"network": "default", "connect": "qemu:///system"}, "binds the bridge of the cluster"),
    ],
)
def test_spec_refuses_what_a_host_worker_cannot_be(kw: dict, message: str) -> None:
    from orchestrator.spec import Tee

    if "worker_tee" in kw:
        kw = {**kw, "worker_tee": Tee(kw["worker_tee"])}
    with pytest.raises(UsageError) as info:
        ClusterSpec(name="hw", workers=kw.pop("workers", 0), worker_host=True, **kw)
    assert message in info.value.message
    assert info.value.hint or "out of range" in info.value.message


# --- up, status, down against the fake backend ---------------------------------------------------


def test_up_records_the_host_worker_and_down_stops_it(backend: HostBackend) -> None:
    st = cluster.up(ClusterSpec(name="hw", masters=2, workers=0, worker_host=True),
                    backend=backend)  # fmt: skip
    assert [vm.role for vm in st.vms] == ["master", "master"]
    hw = state.load("hw").worker_host
    assert hw is not None and hw == st.worker_host
    assert (hw.rank, hw.ifname, hw.pid, hw.device) == (2, "virbr0", 4242, "cpu")
    assert hw.address == ClusterSpec(name="hw", subnet=st.spec["subnet"]).gateway  # the bridge
    assert hw.netns == "gcvm-hw" and hw.log.endswith("logs/worker-host.log")
    assert Path(hw.root, "pyproject.toml").is_file()  # the checkout: PYTHONPATH of its jobs

    report = cluster.status("hw", backend=backend)
    assert report.host_worker is not None and report.host_worker.state == "running"
    text = _render(report)
    assert "hw-worker-host" in text and "worker (host)" in text
    assert "pid 4242" in text and "device cpu (x86_64), 1 threads" in text
    assert f"listens on {hw.address} (virbr0)" in text and "up " in text

    with pytest.raises(GcvmError, match="is the host worker, a process on this host"):
        st.vm("worker-host")
    cluster.down("hw", backend=backend)
    assert backend.stopped and backend.stopped[0] == hw
    assert not state.cluster_dir("hw").exists()


def test_a_failed_up_stops_the_host_worker_it_started(backend: HostBackend) -> None:
    backend.unreachable.add("hf-master0")  # the VM never answers: `up` fails after the worker
    with pytest.raises(Timeout):
        cluster.up(ClusterSpec(name="hf", workers=0, worker_host=True), backend=backend,
                   timeout=1)  # fmt: skip
    assert len(backend.started) == 1
    assert backend.stopped and backend.stopped[0] is not None
    assert backend.stopped[0].pid == 4242  # the record with the pid reached teardown
    assert not state.cluster_dir("hf").exists()


def test_a_host_worker_that_fails_to_start_rolls_back_the_whole_up(backend: HostBackend) -> None:
    backend.fail_start = True
    with pytest.raises(GcvmError, match="before it was ready"):
        cluster.up(ClusterSpec(name="hs", workers=0, worker_host=True), backend=backend)
    assert backend.stopped and backend.stopped[0] is not None and backend.stopped[0].pid == 0
    assert backend.hv.domains() == [] and backend.namespaces == set()
    assert not state.cluster_dir("hs").exists()


# --- the ranks of a run --------------------------------------------------------------------------


def test_ranks_of_a_host_worker_cluster(backend: HostBackend) -> None:
    st = cluster.up(ClusterSpec(name="hr", masters=3, workers=0, worker_host=True),
                    backend=backend)  # fmt: skip
    world = run_world.plan_world(st, 29500)
    assert [(n.name, n.role, n.host, r.rank) for n, r in world] == [
        ("hr-master0", Role.master, False, 0), ("hr-master1", Role.master, False, 1),
        ("hr-master2", Role.master, False, 2), ("hr-worker-host", Role.worker, True, 3),
    ]  # fmt: skip
    assert all(r.worker == 3 and r.world_size == 4 for n, r in world if n.role is Role.master)
    host_rank = world[-1][1]
    assert host_rank.ifname == "virbr0" and host_rank.env()["TP_SOCKET_IFNAME"] == "virbr0"
    assert host_rank.master_addr == st.vms[0].address  # the rendezvous: master 0's VM
    assert "--ifname virbr0" in " ".join(host_rank.argv(sys.executable))

    # two of the three masters share the worker: ranks renumbered, the worker right after them
    two = run_world.plan_world(st, 29500, masters=2)
    assert [(n.name, r.rank) for n, r in two] == [
        ("hr-master0", 0), ("hr-master1", 1), ("hr-worker-host", 2),
    ]  # fmt: skip
    assert all(r.worker == 2 and r.world_size == 3 for n, r in two if n.role is Role.master)
    with pytest.raises(UsageError, match="--masters 4: cluster hr has 3 master VM") as info:
        run_world.plan_world(st, 29500, masters=4)
    assert info.value.hint == "choose 1..3 (default: all of them)"
    env = run_world.host_env(st.worker_host)  # type: ignore[arg-type]
    assert env["GLOO_SOCKET_IFNAME"] == env["TP_SOCKET_IFNAME"] == "virbr0"
    assert env["PYTHONPATH"] == st.worker_host.root  # type: ignore[union-attr]
    facts = run_world.cluster_facts(st)["host_worker"]
    assert facts["device"] == "cpu" and facts["tee"] == "none (host process)"
    cluster.down("hr", backend=backend)


def test_ranks_of_vm_workers_are_unchanged(backend: HostBackend) -> None:
    st = cluster.up(ClusterSpec(name="hv", masters=3, workers=2), backend=backend)
    world = run_world.plan_world(st, 29500)
    assert [(n.name, r.rank, r.worker) for n, r in world] == [
        ("hv-master0", 0, 3), ("hv-master1", 1, 4), ("hv-master2", 2, 3),
        ("hv-worker0", 3, None), ("hv-worker1", 4, None),
    ]  # fmt: skip
    assert not any(n.host for n, _ in world)
    cluster.down("hv", backend=backend)


def _render(report: object) -> str:
    console = Console(width=200, record=True, highlight=False)
    for item in status_renderables(report):
        console.print(item)
    return console.export_text()


def test_uptime_format() -> None:
    assert [format_uptime(s) for s in (5, 65, 3700)] == ["5s", "1m05s", "1h01m"]


# --- the real supervisor: probe, jobs, cancel, stop ----------------------------------------------


@pytest.mark.slow
def test_supervisor_runs_jobs_and_leaves_nothing(tmp_path: Path) -> None:
    hw = hostworker.start(_hw(tmp_path))
    try:
        assert hw.pid > 0 and hw.device in ("cpu", "cuda") and hw.torch
        assert hostworker.alive(hw)
        lines: list[str] = []
        job = hostworker.Job(hw, [sys.executable, "-c",
                                  "import os; print('job says', os.environ['GCVM_X'])"],
                             {"GCVM_X": "hello"}, on_line=lines.append)  # fmt: skip
        deadline = time.monotonic() + 30
        while job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() == 0
        assert "job says hello" in lines

        failing = hostworker.Job(hw, [sys.executable, "-c", "raise SystemExit(3)"], None)
        deadline = time.monotonic() + 30
        while failing.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert failing.poll() == 3

        sleeper = hostworker.Job(hw, [sys.executable, "-c", "import time; time.sleep(600)"], None)
        while not list(Path(hw.dir).glob(f"job-{sleeper.id}.pid")):
            time.sleep(0.1)
        [job_pid] = hostworker.live_jobs(Path(hw.dir))
        sleeper.kill()  # a cancelled job ends; the supervisor keeps serving
        assert sleeper.poll() is not None and hostworker.alive(hw)
        assert not _exists(job_pid)

        # a job left running when the worker stops goes with it
        hostworker.Job(hw, [sys.executable, "-c", "import time; time.sleep(600)"], None)
        while not hostworker.live_jobs(Path(hw.dir)):
            time.sleep(0.1)
        [orphan] = hostworker.live_jobs(Path(hw.dir))
    finally:
        assert hostworker.stop(hw)
    assert not hostworker.alive(hw) and not _exists(hw.pid) and not _exists(orphan)
    assert hostworker.group_pids(hw.pid) == []
    assert not hostworker.stop(hw)  # safe to repeat
    log = Path(hw.log).read_text()
    assert "ready:" in log and "job says hello" in log and "stopped" in log


def test_a_job_for_a_dead_worker_is_refused(tmp_path: Path) -> None:
    hw = _hw(tmp_path, pid=2**22 - 7)  # no such process (or not a supervisor)
    with pytest.raises(hostworker.HostWorkerError, match="is not running") as info:
        hostworker.Job(hw, ["true"], None)
    assert "gcvm logs worker-host" in (info.value.hint or "")


def test_stop_never_signals_a_process_that_is_not_the_supervisor(tmp_path: Path) -> None:
    hw = _hw(tmp_path, pid=os.getpid())  # our own pid: not a supervisor of that folder
    assert not hostworker.is_supervisor(os.getpid(), hw.dir)
    assert hostworker.stop(hw) is False


def test_a_worker_whose_python_is_broken_fails_with_its_log(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    with pytest.raises(hostworker.HostWorkerError, match="exited with status 1") as info:
        hostworker.start(_hw(tmp_path, python=str(fake_python)), timeout=30)
    assert "no torch here" in info.value.message  # the log's last lines say why
    assert info.value.hint and "imports torch" in info.value.hint


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
