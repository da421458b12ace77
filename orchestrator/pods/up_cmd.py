"""`gcvm up --runtime pods`: podman pods here, or (`--kube-context CTX`) the k8s target applied to
a real Kubernetes cluster with kubectl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.pods import lifecycle
from orchestrator.pods.manifests import PodsSpec, Target
from orchestrator.ui import out


def up_pods(name: str, tee: Any, masters: int, workers: int, worker: str, subnet: str | None,
            vcpus: int, memory: int, keep: bool, timeout: float, broker: bool,
            policy: str | None, owner: Path | None, kube_context: str | None = None,
            kbs: str | None = None) -> None:  # fmt: skip
    if worker != "vm":
        raise UsageError("--worker host is for --runtime vms", hint="pods run every rank")
    if kube_context is not None:
        _up_kube(name, tee, masters, workers, subnet, vcpus, memory, broker, policy, owner,
                 kube_context, kbs)  # fmt: skip
        return
    if kbs is not None:
        raise UsageError("--kbs is for --kube-context (a Kubernetes cluster's CoCo pods)",
                         hint="here the key broker is gcvm's own: --broker")  # fmt: skip
    lifecycle.refuse_tee(tee)  # before the spec, which asks a confidential pod for a broker
    spec = PodsSpec(name=name, tee=tee, masters=masters, workers=workers, target=Target.podman,
                    hold=True, subnet=subnet, vcpus=vcpus, memory_mib=memory)  # fmt: skip
    lifecycle.up(spec, keep_on_failure=keep, timeout=timeout, broker=broker, policy=policy,
                 owner=owner)  # fmt: skip
    for line in lifecycle.status_lines(name):
        out.print(line, soft_wrap=True)


def _up_kube(name: str, tee: Any, masters: int, workers: int, subnet: str | None, vcpus: int,
             memory: int, broker: bool, policy: str | None, owner: Path | None, context: str,
             kbs: str | None) -> None:  # fmt: skip
    from orchestrator import ownerid
    from orchestrator.pods import kube
    from orchestrator.pods.render_cmd import default_image

    if broker or policy:
        raise UsageError("--broker runs gcvm's broker on this host's pod network; a Kubernetes "
                         "cluster's confidential pods attest to a KBS",
                         hint="give the KBS with --kbs URL")  # fmt: skip
    if subnet is not None:
        raise UsageError("--subnet is for podman here; a Kubernetes cluster assigns pod "
                         "addresses itself", hint="leave out --subnet")  # fmt: skip
    if str(tee) != "none" and kbs is None:
        raise UsageError(f"--tee {tee} pods need --kbs URL: the key broker (KBS) their "
                         "Attestation Agent and Data Hub attest to (it goes into initdata)",
                         hint="e.g. --kbs https://kbs.example:8080")  # fmt: skip
    spec = PodsSpec(name=name, tee=tee, masters=masters, workers=workers, target=Target.k8s,
                    broker=kbs, owner=ownerid.ensure(owner) if owner else None,
                    image=default_image(), vcpus=vcpus, memory_mib=memory)  # fmt: skip
    kube.up(spec, context)
