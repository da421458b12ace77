"""`gcvm up|down --runtime pods` on this host: one podman pod per rank in the cluster's network
namespace, the framework's wheel installed into each, and everything removed again.

`up`: refuse an existing cluster or namespace, record the cluster (`pods.json`) before creating
anything, make (or reuse) the container image, create the namespace, a podman network on the
cluster's subnet inside it, play the podman target's manifests (static addresses, host aliases,
DNS at 127.0.0.1), copy the wheel into every pod with `podman cp` and install it (no host folder
is mounted), and check that the pods' addresses route to the namespace's bridge and that the
namespace has no default route. Any failure or Ctrl-C removes what was made, also the pod
network namespaces a podman killed mid-way made but did not record (`remove_orphan_netns`).

The owner's pins (the broker's certificate, the package-signing key) go into every master pod as
files the framework is given on its command line (`--broker-cert`, `--owner-key`): nothing
measures them in a runc container (in a CoCo pod, initdata carries them). With `--broker`, the
owner's key broker runs for the cluster's lifetime in the namespace, on the pods' bridge.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import clusterbroker, netns, ownerid, state, ui
from orchestrator.attest.identity import CERT_FILE
from orchestrator.cluster.boot import _shielded, _sigterm_interrupts
from orchestrator.clusterbroker import ClusterBrokerState
from orchestrator.errors import ClusterExists, GcvmError, Interrupted, UsageError
from orchestrator.pods import podman as pm
from orchestrator.pods.manifests import Manifests, PodsSpec, Target, play_argv, render
from orchestrator.remote import Result
from orchestrator.spec import Role, Tee

RECORD = "pods.json"
CONTAINER_PYTHON = "/opt/gcvm/venv/bin/python"
PIN_DIR = "/etc/gcvm/pins"  # in every master pod: the owner's pins, as files (not measured)
PINS = {"broker_cert": CERT_FILE, "owner_key": ownerid.SIGNING_PUB}


def record_path(name: str) -> Path:
    return state.cluster_dir(name) / RECORD


def is_pods(name: str) -> bool:
    return record_path(name).exists()


def load(name: str) -> dict[str, Any]:
    try:
        return json.loads(record_path(name).read_text())
    except FileNotFoundError:
        raise GcvmError(f"no pods cluster {name!r}", hint="gcvm up --runtime pods") from None


def _save(name: str, record: dict[str, Any]) -> None:
    path = record_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def podman_for(name: str, record: dict[str, Any]) -> pm.Podman:
    stores = [Path(p) for p in record.get("image_stores", [])]
    return pm.Podman(state.cluster_dir(name) / "podman", record["netns"], stores)


@dataclass(frozen=True)
class PodsCluster:
    """A pods cluster's record seen as the run code's cluster state (`orchestrator.state.
    ClusterState`): what the packages, the brokers and the ranks read of it."""

    name: str
    netns: str
    spec: dict[str, Any]
    trust: dict[str, Any] | None
    broker: dict[str, Any] | None
    worker_host: None = None
    vms: tuple[()] = ()

    @classmethod
    def of(cls, record: dict[str, Any]) -> PodsCluster:
        return cls(record["name"], record["netns"], {"subnet": record.get("subnet")},
                   record.get("trust"), record.get("broker"))  # fmt: skip

    @property
    def cluster_broker(self) -> ClusterBrokerState | None:
        return None if self.broker is None else ClusterBrokerState.from_dict(self.broker)


@dataclass
class PodTarget:
    """One pod's container as deploy.install's and packages.copy_to's target: `podman exec`
    and `podman cp`."""

    podman: pm.Podman
    name: str  # the pod's name
    container: str

    def run(self, argv: list[str], *, timeout: float, check: bool = True) -> Result:
        proc = self.podman.run("exec", self.container, *argv, timeout=timeout, check=check)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def put(self, local: Path, remote: str, progress: object = None) -> None:
        self.podman.run("cp", str(local), f"{self.container}:{remote}", timeout=600)


def container_of(pod: dict[str, Any]) -> str:
    """kube play names a container <pod>-<container>; the container is named after the role."""
    return f"{pod['name']}-{pod['role']}"


def pod_log(name: str, node: str) -> str:
    """`gcvm logs NODE` of a pods cluster: what the pod's container wrote (podman's log). NODE is
    a pod's name, its short name (master0) or its rank."""
    record = load(name)
    pods = record.get("pods", [])
    for pod in pods:
        short = pod["name"].removeprefix(f"{name}-")
        if node in (pod["name"], short, str(pod.get("rank"))):
            proc = podman_for(name, record).run("logs", container_of(pod), timeout=60,
                                                check=False)  # fmt: skip
            if proc.returncode != 0:
                raise GcvmError(f"podman has no log of {pod['name']}: "
                                f"{(proc.stderr or proc.stdout).strip()[-300:]}")  # fmt: skip
            return proc.stdout + proc.stderr
    names = ", ".join(p["name"].removeprefix(f"{name}-") for p in pods)
    raise UsageError(f"no pod {node!r} in pods cluster {name}", hint=f"its pods: {names}")


def status_lines(name: str) -> list[str]:
    """`gcvm status` of a pods cluster: its record, and each pod's state as podman reports it."""
    record = load(name)
    lines = [
        f"cluster {name}: {record.get('phase')}, pods (podman, no TEE), namespace "
        f"{record['netns']}, subnet {record.get('subnet')}, image {record.get('image')}"
    ]
    states: dict[str, str] = {}
    if record.get("pods") and netns.exists(record["netns"]):
        proc = podman_for(name, record).run(
            "pod", "ps", "--format", "{{.Name}} {{.Status}}", check=False, timeout=30
        )
        states = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    broker = PodsCluster.of(record).cluster_broker
    if broker is not None:
        lines.append(f"key broker: {'running' if clusterbroker.alive(broker) else 'dead'}, pid "
                     f"{broker.pid}, {broker.url}, log {broker.log}")  # fmt: skip
    for pod in record.get("pods", []):
        lines.append(f"  {pod['name']:<20} {pod['role']:<7} rank {pod['rank']:<3} "
                     f"{pod['address']:<16} {states.get(pod['name'], 'gone')}")  # fmt: skip
    return lines


def refuse_tee(tee: Tee, coco_dev: bool = False) -> None:
    """Only --tee none runs here: a TEE pod needs Kata, which podman does not have."""
    if tee is not Tee.none or coco_dev:
        raise UsageError(
            f"--runtime pods runs --tee none here (podman has no Kata runtime); --tee {tee}"
            f"{' --coco-dev' if coco_dev else ''} pods need a Kubernetes cluster with CoCo",
            hint="on a Kubernetes cluster with CoCo: gcvm up --runtime pods --tee tdx|sev-snp "
            "--kube-context CTX --kbs URL (or gcvm render --runtime pods ... --out DIR)",
        )


def up(spec: PodsSpec, *, keep_on_failure: bool = False, timeout: float = 300,
       broker: bool = False, policy: str | None = None, owner: Path | None = None
       ) -> dict[str, Any]:  # fmt: skip
    """Run the podman target; `broker`: the owner's key broker for the cluster's lifetime;
    `owner`: the owner folder whose pins the masters get (default the cluster's)."""
    refuse_tee(spec.tee, spec.coco_dev)
    if policy is not None and not broker:
        raise UsageError(f"--policy {policy} without --broker: the policy is the cluster "
                         "broker's", hint="add --broker (runs start their own broker)")  # fmt: skip
    if policy is not None:
        from orchestrator.runbroker import check_policy

        check_policy(str(spec.tee), Path(policy))  # a missing file, before anything is made
    if spec.target is not Target.podman or not spec.hold:
        raise ValueError("pods up plays the podman target with held containers")
    pm.check_tools()
    started = time.monotonic()
    # the VM clusters' rules: SIGTERM interrupts like Ctrl-C; the cleanup is not interrupted
    with state.locked(spec.name), _sigterm_interrupts():
        ns = f"gcvm-{spec.name}"
        if state.exists(spec.name) or is_pods(spec.name) or netns.exists(ns):
            raise ClusterExists(f"cluster {spec.name!r} already exists (or left a namespace)",
                                hint=f"gcvm down --name {spec.name}")  # fmt: skip
        record: dict[str, Any] = {
            "name": spec.name,
            "runtime": "pods",
            "netns": ns,
            "network": ns,
            "subnet": str(spec.cluster.ipv4),
            "phase": "creating",
            "created": time.time(),
            "pods": [],
        }
        _save(spec.name, record)
        before = podman_netns()  # to find what a podman killed mid-way leaves
        try:
            _up(spec, record, timeout, broker, policy, owner)
        except BaseException as exc:
            if keep_on_failure:
                ui.warn(f"kept the failed cluster; remove it with `gcvm down --name {spec.name}`")
            else:
                with _shielded(), ui.step(f"clean up the failed cluster {spec.name}"):
                    new = podman_netns() - before
                    wired = {n for n in new if _peers(n) == {record["netns"]}}  # before teardown
                    _teardown(spec.name, record)
                    remove_orphan_netns(new, wired)
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted("interrupted; the cluster was removed") from None
            raise
    ui.info(f"cluster {spec.name} ready in {time.monotonic() - started:.1f} s "
            f"({len(record['pods'])} pods)")  # fmt: skip
    return record


def _up(spec: PodsSpec, record: dict[str, Any], timeout: float, broker: bool,
        policy: str | None, owner: Path | None) -> None:  # fmt: skip
    from orchestrator import deploy, image, packages

    with ui.step("the owner's identities (broker certificate, package-signing key)"):
        ident = ownerid.ensure(packages.owner_dir(spec.name, owner))
        record["trust"] = ident.facts()
        _save(spec.name, record)
        # no initdata here: podman 4.3.1 refuses annotation values over 63 characters

    with ui.step("find the guest image"):
        found = image.find_image()
        if found.recipe_hash is None:
            raise UsageError("the pods runtime makes its image from gcvm's own guest image",
                             hint="gcvm image build")  # fmt: skip
    store = pm.ensure_image(found.disk, found.recipe_hash)
    record["image"] = pm.image_tag(found.recipe_hash)
    record["image_stores"] = [str(pm.image_storage(store))]
    _save(spec.name, record)
    podman = podman_for(spec.name, record)
    podman.write_config()
    with ui.step(f"create namespace {record['netns']} and network {record['network']}"):
        netns.create(record["netns"])
        cluster = spec.cluster
        podman.run("network", "create", "--subnet", str(cluster.ipv4), "--gateway",
                   cluster.gateway, record["network"])  # fmt: skip
    made = _render(spec, record)
    record["pods"] = [{"name": p.name, "role": p.role, "rank": p.rank, "address": p.address}
                      for p in made.pods]  # fmt: skip
    _save(spec.name, record)
    with ui.step(f"play {len(made.pods)} pods"):
        argv = play_argv(made, record["network"], str(_manifests(spec.name) / "play.yaml"))
        podman.run(*argv[1:], timeout=timeout)
        wait_running(podman, record["pods"], min(timeout, READY_TIMEOUT_S))
    with ui.step("build the project's wheel"):
        wheel = deploy.build_wheel(state.cluster_dir(spec.name) / "wheels")
    with ui.step(f"install {wheel.name} into {len(made.pods)} pods (podman cp, pip)"):
        for pod in record["pods"]:
            deploy.install(PodTarget(podman, pod["name"], container_of(pod)), wheel,
                           CONTAINER_PYTHON, timeout=timeout)  # fmt: skip
    with ui.step("give the masters the owner's pins (files for --broker-cert/--owner-key)"):
        record["pins"] = give_pins(podman, record, ident)
    with ui.step("check the pods' isolation"):
        record["isolation"] = check_isolation(record)
    if broker:  # on the pods' bridge, which exists once a pod is attached to it

        def keep(b: ClusterBrokerState) -> None:
            record["broker"] = b.to_dict()
            _save(spec.name, record)

        clusterbroker.start_recorded(clusterbroker.for_owner(
            ident.folder, spec.cluster.gateway, record["netns"], policy), keep)  # fmt: skip
    record["phase"] = "ready"
    _save(spec.name, record)


READY_TIMEOUT_S = 60.0
DEAD = ("exited", "stopped", "dead")


def _running(status: str) -> bool:
    return status.startswith("Up") or status.lower() == "running"


def wait_running(podman: pm.Podman, pods: list[dict[str, Any]], timeout: float) -> None:
    """Until every pod's container runs; one that exited or never starts fails `up` with the
    tail of its log."""
    names = [container_of(pod) for pod in pods]
    deadline = time.monotonic() + timeout
    while True:
        proc = podman.run("ps", "--all", "--format", "{{.Names}} {{.State}}", check=False)
        states = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
        # podman 4.3 says "Up 3 seconds ago", "Exited (127) 2 seconds ago", "Created"
        waiting = [n for n in names if not _running(states.get(n, ""))]
        if not waiting:
            return
        dead = [n for n in waiting if states.get(n, "").lower().startswith(DEAD)]
        if dead or time.monotonic() > deadline:
            name = (dead or waiting)[0]
            logs = podman.run("logs", "--tail", "5", name, check=False)
            tail = " | ".join((logs.stdout + logs.stderr).strip().splitlines()[-5:]) or "(none)"
            what = (
                f"has stopped ({states.get(name)})"
                if dead
                else f"is not running after {timeout:.0f} s"
            )
            raise GcvmError(f"pod container {name} {what}; its log: {tail}",
                            hint="gcvm image build (the pods' image is made from the guest "
                            "image), or --keep-on-failure to look at it")  # fmt: skip
        time.sleep(0.5)


def give_pins(podman: pm.Podman, record: dict[str, Any], ident: ownerid.OwnerIdentity
              ) -> dict[str, str]:  # fmt: skip
    """The owner's pins into every master pod as files (podman cp), for the framework's
    `--broker-cert`/`--owner-key` (BROKER_CERT/OWNER_KEY for the seed scripts): in a runc
    container nothing measures them; the host could replace them."""
    sources = {"broker_cert": ident.broker_dir / CERT_FILE, "owner_key": ident.signing_pub}
    for pod in record["pods"]:
        if pod["role"] != Role.master.value:
            continue
        container = container_of(pod)
        podman.run("exec", container, "mkdir", "-p", PIN_DIR, timeout=30)
        for key, file_name in PINS.items():
            podman.run("cp", str(sources[key]), f"{container}:{PIN_DIR}/{file_name}")
    return {key: f"{PIN_DIR}/{file_name}" for key, file_name in PINS.items()}


def _manifests(name: str) -> Path:
    return state.cluster_dir(name) / "manifests"


def _render(spec: PodsSpec, record: dict[str, Any]) -> Manifests:
    from dataclasses import replace

    made = render(replace(spec, image=record["image"]))
    folder = _manifests(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, text in made.files.items():
        (folder / file_name).write_text(text)
    return made


def check_isolation(record: dict[str, Any]) -> dict[str, str]:
    """Inside the namespace every pod address routes to the pods' bridge and nothing else is
    routed (no default route): asked of the kernel with `ip route get`, no packet sent."""
    routes: dict[str, str] = {}
    for pod in record["pods"]:
        out = _ip_in(record["netns"], "route", "get", pod["address"])
        if " dev cni-podman" not in out:
            raise GcvmError(f"pod {pod['name']} ({pod['address']}) does not route to the "
                            f"namespace's bridge: {out}")  # fmt: skip
        routes[pod["address"]] = out
    table = _ip_in(record["netns"], "route", "show")
    if "default" in table:
        raise GcvmError(f"namespace {record['netns']} has a default route: {table}")
    routes["table"] = table
    return routes


def _ip_in(ns: str, *args: str) -> str:
    proc = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    return (proc.stdout or proc.stderr).strip()


def down(name: str) -> list[str]:
    with state.locked(name):
        try:
            record = load(name)
        except GcvmError:
            record = {"name": name, "netns": f"gcvm-{name}", "network": f"gcvm-{name}"}
        started = time.monotonic()
        with ui.step(f"remove pods cluster {name}"):
            removed = _teardown(name, record)
        ui.info(f"removed {', '.join(removed) or 'nothing'} in {time.monotonic() - started:.1f} s")
        return removed


def _teardown(name: str, record: dict[str, Any]) -> list[str]:
    """Pods, podman network, CNI leases, namespace, the cluster's folder; safe to repeat."""
    removed: list[str] = []
    cdir = state.cluster_dir(name)
    ns = record["netns"]
    podman = podman_for(name, {**record, "image_stores": record.get("image_stores", [])})
    broker = PodsCluster.of({**record, "subnet": None}).cluster_broker
    if broker is not None:
        if clusterbroker.stop(broker):
            removed.append("key broker")
        clusterbroker.remove_repository(broker)
    if (cdir / "podman" / "storage.conf").exists() and netns.exists(ns):
        pods = podman.run("pod", "ps", "-q", check=False).stdout.split()
        if pods:
            podman.run("pod", "rm", "--force", "--all", "--time", "0", check=False, timeout=120)
            removed.append(f"{len(pods)} pods")
        if podman.run("network", "rm", "--force", record["network"], check=False).returncode == 0:
            removed.append(f"network {record['network']}")
    leases = Path("/var/lib/cni/networks") / record["network"]
    if leases.exists():
        shutil.rmtree(leases, ignore_errors=True)
    if netns.exists(ns):
        _kill(netns.pids(ns))
        netns.delete(ns)
        removed.append(f"namespace {ns}")
    _unmount_under(cdir)
    if cdir.exists():
        shutil.rmtree(cdir)
        removed.append(str(cdir))
    return removed


def podman_netns(folder: Path = Path("/run/netns")) -> set[str]:
    """The network namespaces podman made for pods (`netns-<uuid>`), each host-wide."""
    return {p.name for p in folder.glob("netns-*")} if folder.is_dir() else set()


def _peers(ns: str) -> set[str]:
    """The named namespaces `ns`'s interfaces lead to (a pod's veth: its bridge's namespace)."""
    out = _ip_in(ns, "netns", "list-id")  # "nsid 0 (iproute2 netns name: gcvm-x)"
    return {line.rsplit(": ", 1)[1].rstrip(")") for line in out.splitlines() if "name: " in line}


def remove_orphan_netns(candidates: set[str], wired: set[str] | None = None,
                        settle: float = 1.0) -> list[str]:  # fmt: skip
    """Deletes those of `candidates` (podman namespaces that appeared while a failed `up` ran)
    that are this cluster's orphans: a podman killed between making a pod's namespace and
    recording it leaves one that `pod rm` cannot see. `wired`: those whose veth led to this
    cluster's namespace (found before it was deleted). One that was not wired must hold only `lo`
    and no process, and still do `settle` s later (a live pod's namespace gets its veth within
    milliseconds of being made), so another podman's namespace is never taken."""

    def idle(ns: str) -> bool:
        return not netns.pids(ns)

    def bare(ns: str) -> bool:
        links = _ip_in(ns, "-o", "link", "show").splitlines()
        return len(links) == 1 and ": lo:" in links[0] and idle(ns)

    wired = wired or set()
    suspects = [ns for ns in sorted(candidates - wired) if bare(ns)]
    if suspects:
        time.sleep(settle)
    gone = [ns for ns in sorted(wired) if idle(ns)] + [ns for ns in suspects if bare(ns)]
    removed = [ns for ns in gone if netns.delete(ns)]
    if removed:
        ui.info(f"removed {len(removed)} network namespace(s) a killed podman left: "
                f"{', '.join(removed)}")  # fmt: skip
    return removed


def _kill(pids: list[int]) -> None:
    """What is left in the namespace (conmon, a container podman could not stop)."""
    own = os.getpid()
    for pid in pids:
        if pid != own:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _unmount_under(folder: Path) -> None:
    """Overlay and shm mounts podman left under the cluster's folder (a podman that died)."""
    prefix = str(folder.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4] for line in lines if line.split()[4].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
