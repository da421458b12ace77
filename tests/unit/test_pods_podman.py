"""The pods runtime without podman: its private configuration, the namespace every command runs
in, the refusals of `up`, the bench's rank plan, and `down` on what a crash left."""

from __future__ import annotations

import tomllib
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from orchestrator.errors import UsageError
from orchestrator.pods import bench, lifecycle
from orchestrator.pods import podman as pm
from orchestrator.pods.manifests import PodsSpec, Target
from orchestrator.run.settings import BenchSettings
from orchestrator.spec import Tee


def test_private_configuration(tmp_path: Path) -> None:
    podman = pm.Podman(tmp_path / "p", "gcvm-x", [tmp_path / "store"])
    podman.write_config()
    conf = tomllib.loads((tmp_path / "p" / "containers.conf").read_text())
    assert conf["engine"]["runtime"] == "runc"
    assert conf["engine"]["cgroup_manager"] == "cgroupfs"
    assert conf["engine"]["events_logger"] == "file"
    assert conf["network"]["network_config_dir"] == str(tmp_path / "p" / "cni")
    assert "nofile=20000:20000" in conf["containers"]["default_ulimits"]
    storage = tomllib.loads((tmp_path / "p" / "storage.conf").read_text())
    assert storage["storage"]["graphroot"].startswith(str(tmp_path / "p"))
    assert storage["storage"]["options"]["additionalimagestores"] == [str(tmp_path / "store")]
    assert podman.env["CONTAINERS_REGISTRIES_CONF"] == str(tmp_path / "p" / "registries.conf")


def test_every_command_runs_in_the_namespace(tmp_path: Path) -> None:
    assert pm.Podman(tmp_path, "gcvm-x").argv(["ps"]) == [
        "nsenter", "--net=/run/netns/gcvm-x", "podman", "ps"]  # fmt: skip
    assert pm.Podman(tmp_path, None).argv(["import"]) == ["podman", "import"]


def test_a_killed_podman_is_one_line_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda argv, **_: CompletedProcess(argv, -9, "", ""))
    with pytest.raises(pm.PodmanError) as caught:
        pm.Podman(tmp_path, "gcvm-x").run("kube", "play", "--network", "n", "play.yaml")
    assert caught.value.message == "`podman kube play --network` was killed by SIGKILL"
    assert "run the command again" in (caught.value.hint or "")


@pytest.mark.parametrize("kw", [{"tee": Tee.tdx, "broker": "https://kbs:8080"},
                                {"coco_dev": True, "broker": "https://kbs:8080"}])  # fmt: skip
def test_up_refuses_tee_pods_here(kw: dict) -> None:
    with pytest.raises(UsageError, match="Kubernetes cluster with CoCo"):
        lifecycle.up(PodsSpec(name="x", target=Target.podman, hold=True, **kw))


def test_bench_plan_world_and_flags() -> None:
    record = {"pods": [
        {"name": "c-master0", "role": "master", "rank": 0, "address": "10.0.0.10"},
        {"name": "c-master1", "role": "master", "rank": 1, "address": "10.0.0.11"},
        {"name": "c-worker0", "role": "worker", "rank": 2, "address": "10.0.0.12"}]}  # fmt: skip
    planned = bench.plan(record, BenchSettings(model="seed-transformer"), "/r")
    argvs = {pod["name"]: argv for pod, argv in planned}
    m1 = argvs["c-master1"]
    assert m1[:4] == [lifecycle.CONTAINER_PYTHON, "-m", "groupcover", "launch"]
    assert m1[m1.index("--worker") + 1] == "2" and m1[m1.index("--rank") + 1] == "1"
    assert m1[m1.index("--master-addr") + 1] == "10.0.0.10"
    assert m1[m1.index("--model") + 1] == "seed-transformer"
    assert m1[-2:] == ["--json", "/r/c-master1.json"]
    assert "--model" not in argvs["c-worker0"] and "--json" not in argvs["c-worker0"]
    only_one = bench.plan(record, BenchSettings(model="seed-transformer", masters=1), "/r")
    assert [p["name"] for p, _ in only_one] == ["c-master0", "c-worker0"]


def test_bench_ranks_from_packages_with_the_pins() -> None:
    """Masters open the packages with the broker's key and the pins as files on their command
    line; workers load the published weights; the flags are the VM runtime's (run.deploy)."""
    from types import SimpleNamespace

    from orchestrator.pods.session import PodsRun, node
    from orchestrator.run import deploy

    record = {"pods": [
        {"name": "c-master0", "role": "master", "rank": 0, "address": "10.0.0.10"},
        {"name": "c-worker0", "role": "worker", "rank": 1, "address": "10.0.0.11"}],
        "pins": {"broker_cert": "/etc/gcvm/pins/broker.pem",
                 "owner_key": "/etc/gcvm/pins/owner.pub"}}  # fmt: skip
    pkg = SimpleNamespace(package_id="abc", folder=Path("/host/pkg"))
    broker = SimpleNamespace(url="https://10.0.0.1:4321")
    run = PodsRun("c", Path("/nowhere"))
    run.record = record

    def model_args(pod: dict, role: object) -> list[str]:
        return deploy.model_args(node(pod), role, [pkg], broker, "none") + run.pin_args(pod)  # type: ignore[arg-type, list-item]

    planned = dict((p["name"], a) for p, a in bench.plan(
        record, BenchSettings(model="minilm"), "/r", model_args))  # fmt: skip
    master, worker = planned["c-master0"], planned["c-worker0"]
    assert master[master.index("--model") + 1] == "/var/lib/gcvm/packages/abc"
    assert master[master.index("--broker") + 1] == "https://10.0.0.1:4321"
    assert master[master.index("--tee") + 1] == "none"
    assert master[master.index("--broker-cert") + 1] == "/etc/gcvm/pins/broker.pem"
    assert master[master.index("--owner-key") + 1] == "/etc/gcvm/pins/owner.pub"
    assert worker[worker.index("--package") + 1] == "/var/lib/gcvm/packages/abc"
    assert "--broker" not in worker and "--broker-cert" not in worker
    assert run.pin_env(record["pods"][0]) == {"BROKER_CERT": "/etc/gcvm/pins/broker.pem",
                                              "OWNER_KEY": "/etc/gcvm/pins/owner.pub"}  # fmt: skip
    assert run.pin_env(record["pods"][1]) == {}


def test_a_pods_record_as_the_run_codes_cluster_state() -> None:
    """The run code's brokers see a pods cluster as a VM cluster: a run's broker in the
    cluster's namespace on the bridge's host address, or the cluster's own (`up --broker`)."""
    from orchestrator import clusterbroker, packages, runbroker

    record = {"name": "c", "netns": "gcvm-c", "subnet": "192.168.200.0/24", "pods": []}
    view = lifecycle.PodsCluster.of(record)
    assert packages.bridge_address(view) == "192.168.200.1"
    assert view.cluster_broker is None
    own = runbroker.broker_for(view, {}, "none", None, Path("/o/broker.log"), Path("/o/id"))
    assert isinstance(own, runbroker.RunBroker)
    assert (own.netns, own.host, own.identity) == ("gcvm-c", "192.168.200.1", Path("/o/id"))
    b = clusterbroker.for_owner(Path("/o"), "192.168.200.1", "gcvm-c", None)
    assert b.identity == "/o/broker-identity" and b.insecure
    shared = lifecycle.PodsCluster.of({**record, "broker": b.to_dict()})
    assert shared.cluster_broker == b
    assert isinstance(runbroker.broker_for(shared, {}, "none", None, Path("/l"), None),
                      runbroker.ClusterBrokerUse)  # fmt: skip


def test_pod_target_reports_exit_codes(tmp_path: Path) -> None:
    """packages.copy_to reads a pod's digests only when `cat` succeeded (`rc`)."""

    class Fake(pm.Podman):
        def run(self, *args: str, **kw: object) -> CompletedProcess[str]:  # type: ignore[override]
            return CompletedProcess(list(args), 1, "", "no such file")

    target = lifecycle.PodTarget(Fake(tmp_path, "ns"), "p", "p-master")
    result = target.run(["cat", "x"], timeout=5, check=False)
    assert (result.rc, result.stderr) == (1, "no such file")


def test_up_refuses_a_policy_without_the_broker() -> None:
    with pytest.raises(UsageError, match="without --broker"):
        lifecycle.up(PodsSpec(name="x", target=Target.podman, hold=True), policy="p.yaml")


def test_down_after_a_crash_removes_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    cdir = lifecycle.state.cluster_dir("crashed")
    (cdir / "podman").mkdir(parents=True)
    (cdir / lifecycle.RECORD).write_text('{"name": "crashed", "netns": "gcvm-crashed-none", '
                                         '"network": "gcvm-crashed-none", "pods": []}')  # fmt: skip
    assert lifecycle.is_pods("crashed")
    removed = lifecycle.down("crashed")
    assert removed == [str(cdir)] and not cdir.exists()
    assert lifecycle.down("crashed") == []  # safe to repeat


def test_a_failed_up_removes_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from orchestrator import image

    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    monkeypatch.setattr(pm, "check_tools", lambda: None)
    fake = SimpleNamespace(recipe_hash="abc", disk=tmp_path / "disk.qcow2")
    monkeypatch.setattr(image, "find_image", lambda: fake)
    seen = []

    def broken(disk: Path, recipe: str) -> Path:
        seen.append(lifecycle.is_pods("failing"))  # recorded before anything is made
        raise pm.PodmanError("import failed")

    monkeypatch.setattr(pm, "ensure_image", broken)
    with pytest.raises(pm.PodmanError, match="import failed"):
        lifecycle.up(PodsSpec(name="failing", target=Target.podman, hold=True))
    assert seen == [True]
    assert not lifecycle.state.cluster_dir("failing").exists()


class _Scripted(pm.Podman):
    """podman answering `ps` and `logs` from a script (no daemon)."""

    def __init__(self, root: Path, states: str, log: str) -> None:
        super().__init__(root, "ns")
        self.states, self.log = states, log

    def run(self, *args: str, **kw: object) -> CompletedProcess[str]:  # type: ignore[override]
        out = self.states if args[0] == "ps" else self.log
        return CompletedProcess(list(args), 0, out, "")


PODS = [{"name": "c-master0", "role": "master"}, {"name": "c-worker0", "role": "worker"}]


def test_a_pod_that_exits_fails_up_with_its_log(tmp_path: Path) -> None:
    states = "c-master0-master Up 3 seconds ago\nc-worker0-worker Exited (127) 1 second ago\n"
    podman = _Scripted(tmp_path, states, "line 1\nexec: sleep: not found\n")
    with pytest.raises(lifecycle.GcvmError, match=r"c-worker0-worker has stopped \(Exited "
                       r"\(127\).*sleep: not found"):  # fmt: skip
        lifecycle.wait_running(podman, PODS, timeout=5)


def test_a_pod_that_never_runs_fails_up_after_the_timeout(tmp_path: Path) -> None:
    podman = _Scripted(
        tmp_path, "c-master0-master Up 3 seconds ago\nc-worker0-worker Created\n", ""
    )
    with pytest.raises(lifecycle.GcvmError, match="is not running after 0 s; its log: \\(none\\)"):
        lifecycle.wait_running(podman, PODS, timeout=0.01)
    lifecycle.wait_running(_Scripted(tmp_path, "c-master0-master Up 1 second ago\nc-worker0-worker "
                                     "Up 2 seconds ago\n", ""), PODS, timeout=1)  # fmt: skip


def test_missing_podman_is_one_line_with_the_apt_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        pm.shutil, "which", lambda tool: None if tool in ("podman", "runc") else "/x"
    )
    with pytest.raises(pm.HostUnsupported, match="needs podman, runc") as info:
        lifecycle.up(PodsSpec(name="x", target=Target.podman, hold=True))
    assert info.value.hint is not None and "apt-get install podman runc" in info.value.hint


def test_a_second_up_with_one_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    monkeypatch.setattr(pm, "check_tools", lambda: None)
    lifecycle._save("twice", {"name": "twice", "netns": "gcvm-twice", "pods": []})
    with pytest.raises(lifecycle.ClusterExists, match="already exists") as info:
        lifecycle.up(PodsSpec(name="twice", target=Target.podman, hold=True))
    assert info.value.exit_code == 2 and "gcvm down --name twice" in str(info.value.hint)
    assert lifecycle.is_pods("twice")  # the first cluster's record is untouched


def test_only_orphan_podman_namespaces_are_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a podman killed mid-way: a namespace holding only lo and no process goes; one with
    a veth (a live pod's) or a process stays."""
    links = {"netns-orphan": "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536",
             "netns-live": "1: lo: <LOOPBACK>\n2: eth0@if7: <BROADCAST>",
             "netns-busy": "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536"}  # fmt: skip
    deleted: list[str] = []
    monkeypatch.setattr(lifecycle, "_ip_in", lambda ns, *args: links[ns])
    monkeypatch.setattr(lifecycle.netns, "pids", lambda ns: [42] if ns == "netns-busy" else [])
    monkeypatch.setattr(lifecycle.netns, "delete", lambda ns: deleted.append(ns) or True)
    assert lifecycle.remove_orphan_netns(set(links), settle=0) == ["netns-orphan"]
    assert deleted == ["netns-orphan"]
    assert lifecycle.remove_orphan_netns(set(), settle=0) == []
    # one whose veth led to the cluster's namespace (seen before teardown) goes too
    assert lifecycle.remove_orphan_netns({"netns-live"}, {"netns-live"}, settle=0) == ["netns-live"]
