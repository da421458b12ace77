"""Kubernetes manifests for a cluster of pods: one renderer, two targets.

- **k8s**: for a Kubernetes cluster with the confidential-containers runtime classes. A master
  is a Kata pod (`kata-qemu-tdx`, `kata-qemu-snp`, or `kata-qemu-coco-dev` for the CoCo stack
  without a hardware TEE) with its VM sized by annotations and the CoCo initdata (the key
  broker for the guest's Attestation Agent and Confidential Data Hub, the owner's pins); workers
  are ordinary pods (a GPU each with `--worker-gpu`); Services give rank 0's rendezvous and each
  worker a stable name.
- **podman**: the same objects for `podman kube play` on one host, which ignores runtime classes
  and Services and has no cluster DNS: every pod gets a static address, every name a host alias,
  and DNS points at 127.0.0.1 so no lookup leaves for the host's nameserver.

Each object comes from one template under `vm_templates/pods/` (jinja2, StrictUndefined, every
value written as JSON, which YAML reads back unchanged). Rendering is a pure function of
`PodsSpec`: the same inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jinja2
import yaml

from orchestrator.errors import UsageError
from orchestrator.ownerid import OwnerIdentity
from orchestrator.pods import initdata
from orchestrator.spec import ClusterSpec, Role, Tee, plan_vms

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "vm_templates" / "pods"
KATA = "io.katacontainers.config.hypervisor."
RUNTIME_CLASSES = {Tee.tdx: "kata-qemu-tdx", Tee.sev_snp: "kata-qemu-snp"}
COCO_DEV = "kata-qemu-coco-dev"
IFNAME = "eth0"
LABEL = "gcvm.dev/"
DEFAULT_PORT = 29500
MASTER_SCRIPT = "/opt/gcvm/venv/bin/tee_test_transformer_master.py"
WORKER_SCRIPT = "/opt/gcvm/venv/bin/tee_test_transformer_worker.py"
# a master that opens model packages (MODEL=...) in a CoCo pod sets BROKER to this: the key
# comes from the pod's Confidential Data Hub (the seed's built-in model needs no key)
CDH_BROKER = "cdh://"


class Target(StrEnum):
    k8s = "k8s"
    podman = "podman"


@dataclass(frozen=True)
class PodsSpec:
    name: str = "gcvm"
    tee: Tee = Tee.none
    masters: int = 1
    workers: int = 1
    worker_gpu: bool = False
    target: Target = Target.k8s
    coco_dev: bool = False
    broker: str | None = None  # the KBS URL written into initdata
    owner: OwnerIdentity | None = None
    image: str = "localhost/gcvm-guest:latest"
    port: int = DEFAULT_PORT
    subnet: str | None = None  # podman: the pods' network (default: the name's own /24)
    vcpus: int = 1
    memory_mib: int = 2048
    hold: bool = False  # podman for `gcvm up`: the containers wait; `gcvm run` starts the ranks
    extra_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.coco_dev and self.tee is not Tee.none:
            raise UsageError(
                f"--coco-dev with --tee {self.tee}",
                hint="--coco-dev is the CoCo stack without a hardware TEE: use it with --tee none",
            )
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port} is not a TCP port", hint="use 1-65535")
        if self.broker is not None and not self.broker.startswith(("http://", "https://")):
            raise UsageError(
                f"--broker {self.broker!r} is not an http(s) URL",
                hint="the KBS the pod's guest attests to, e.g. https://kbs.example:8080",
            )
        if self.confidential and self.broker is None:
            raise UsageError(
                "a confidential pod needs --broker URL",
                hint="the key broker (KBS) its Attestation Agent and Data Hub attest to",
            )
        _ = self.cluster  # validates name, counts and subnet

    @property
    def cluster(self) -> ClusterSpec:
        return ClusterSpec(name=self.name, masters=self.masters, workers=self.workers,
                           subnet=self.subnet, memory_mib=self.memory_mib,
                           vcpus=self.vcpus)  # fmt: skip

    @property
    def runtime_class(self) -> str | None:
        if self.tee in RUNTIME_CLASSES:
            return RUNTIME_CLASSES[self.tee]
        return COCO_DEV if self.coco_dev else None

    @property
    def confidential(self) -> bool:
        return self.runtime_class is not None

    @property
    def namespace(self) -> str:
        return f"gcvm-{self.name}"

    @property
    def rendezvous(self) -> str:
        return f"{self.name}-rendezvous"


@dataclass(frozen=True)
class PodPlan:
    name: str
    role: str
    rank: int
    address: str  # podman: its static address; k8s: informational (the pod IP is the cluster's)
    hostname: str
    image: str
    pull_policy: str
    command: list[str]
    env: list[tuple[str, str | None]]  # None: the pod's own IP (k8s fieldRef)
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    runtime_class: str | None = None
    gpu: bool = False
    host_aliases: list[dict[str, Any]] = field(default_factory=list)
    nameservers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifests:
    files: dict[str, str]  # file name -> YAML, in apply order
    pods: list[PodPlan]
    initdata: initdata.Initdata | None


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML, every value through tojson
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(template: str, **context: Any) -> str:
    text = _environment().get_template(template).render(**context).rstrip("\n") + "\n"
    yaml.safe_load(text)  # a template that breaks YAML fails here, not in a cluster
    return text


def plan(spec: PodsSpec) -> tuple[list[PodPlan], initdata.Initdata | None]:
    cluster = spec.cluster
    vms = plan_vms(cluster, Path("/nonexistent"))  # names, ranks, addresses; no files
    world = len(vms)
    podman = spec.target is Target.podman
    data = initdata.make(spec.broker, spec.owner) if (spec.broker or spec.owner) else None
    aliases: list[dict[str, Any]] = []
    if podman:
        aliases = [{"ip": vm.address, "hostnames": [vm.name]} for vm in vms]
        aliases[0]["hostnames"].append(spec.rendezvous)
    pods = []
    for vm in vms:
        master = vm.role is Role.master
        env: list[tuple[str, str | None]] = [
            ("RANK", str(vm.rank)),
            ("WORLD_SIZE", str(world)),
        ]
        if master:
            env.append(("WORKER", str(spec.masters + vm.index % spec.workers)))
        # rank 0 holds the rendezvous and binds MASTER_ADDR: its own address; the others
        # reach it by the rendezvous Service's name (a host alias under podman)
        own = vm.address if podman else None
        env.append(("MASTER_ADDR", own if vm.rank == 0 else spec.rendezvous))
        env += [("MASTER_PORT", str(spec.port)), ("GLOO_SOCKET_IFNAME", IFNAME),
                ("TP_SOCKET_IFNAME", IFNAME), ("FORCE_TCP", "1")]  # fmt: skip
        annotations: dict[str, str] = {}
        runtime_class = None
        if master and spec.confidential:
            runtime_class = spec.runtime_class
            annotations[KATA + "default_vcpus"] = str(spec.vcpus)
            annotations[KATA + "default_memory"] = str(spec.memory_mib)
        if master and data is not None:
            annotations[initdata.ANNOTATION] = data.annotation
        env += list(spec.extra_env)
        script = MASTER_SCRIPT if master else WORKER_SCRIPT
        command = ["/usr/bin/sleep", "infinity"] if spec.hold else [script]
        local_image = spec.image.startswith("localhost/")
        pods.append(PodPlan(
            name=vm.name, role=vm.role.value, rank=vm.rank, address=vm.address,
            hostname=vm.name, image=spec.image,
            pull_policy="Never" if local_image else "IfNotPresent", command=command, env=env,
            labels={LABEL + "cluster": spec.name, LABEL + "role": vm.role.value,
                    LABEL + "rank": str(vm.rank)},
            annotations=annotations, runtime_class=runtime_class,
            gpu=spec.worker_gpu and not master, host_aliases=aliases,
            nameservers=["127.0.0.1"] if podman else [],
        ))  # fmt: skip
    return pods, data


def render(spec: PodsSpec) -> Manifests:
    pods, data = plan(spec)
    labels = {LABEL + "cluster": spec.name}
    files: dict[str, str] = {}
    files["00-namespace.yaml"] = _render(
        "namespace.yaml.j2", namespace=spec.namespace, labels=labels
    )
    for pod in pods:
        files[f"10-{pod.name}.yaml"] = _render("pod.yaml.j2", pod=pod, namespace=spec.namespace)
    services = [{"name": spec.rendezvous, "port": spec.port,
                 "selector": {LABEL + "cluster": spec.name, LABEL + "rank": "0"}}]  # fmt: skip
    services += [
        {"name": p.name, "port": None,
         "selector": {LABEL + "cluster": spec.name, LABEL + "rank": str(p.rank)}}
        for p in pods if p.role == Role.worker.value
    ]  # fmt: skip
    for service in services:
        files[f"20-{service['name']}.yaml"] = _render(
            "service.yaml.j2", service=service, namespace=spec.namespace, labels=labels
        )
    if spec.target is Target.podman:
        # what `podman kube play` runs: the pods in rank order (one --ip each, in that order)
        files["play.yaml"] = "---\n".join(files[f"10-{p.name}.yaml"] for p in pods)
    return Manifests(files, pods, data)


def play_argv(manifests: Manifests, network: str, path: str = "play.yaml") -> list[str]:
    """`podman kube play` for the podman target: one static address per pod, in file order."""
    argv = ["podman", "kube", "play", "--network", network]
    for pod in manifests.pods:
        argv += ["--ip", pod.address]
    return [*argv, path]


def documents(manifests: Manifests) -> list[dict[str, Any]]:
    """Every object once (not play.yaml's copies), parsed."""
    return [yaml.safe_load(text) for name, text in manifests.files.items() if name != "play.yaml"]
