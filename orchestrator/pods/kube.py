"""A pods cluster on a real Kubernetes cluster: `gcvm up --runtime pods --kube-context CTX`
applies the `k8s` target's manifests (the same renderer and validation as `gcvm render
--runtime pods`) with kubectl, and `gcvm down` deletes them.

Why kubectl and not a Kubernetes client library: the user's kubeconfig, its contexts, exec
credential plugins and proxies are kubectl's to interpret (Debian's `kubernetes-client`), and
`apply -f DIR` / `delete -f DIR` is the contract every cluster honours. gcvm keeps what it applied
under the cluster's state folder (`k8s/`, `kube.json`), so `down` deletes exactly that, and a
failed apply is deleted again before `up` fails.

The pods' images must be pullable by the cluster (`--image`: the default names the image `gcvm
up --runtime pods` makes locally, which a real cluster has to get from a registry); confidential
pods need CoCo's runtime classes and a KBS (`--kbs URL`) that the masters' initdata names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from orchestrator import state, ui
from orchestrator.errors import ClusterExists, GcvmError, UsageError
from orchestrator.pods.manifests import PodsSpec, Target, render
from orchestrator.pods.render_cmd import validate, write

RECORD = "kube.json"
INSTALL_HINT = "apt-get install kubernetes-client (Debian's kubectl)"


class KubeError(GcvmError):
    pass


def record_path(name: str) -> Path:
    return state.cluster_dir(name) / RECORD


def is_kube(name: str) -> bool:
    return record_path(name).is_file()


def kubectl(context: str, *args: str) -> list[str]:
    """kubectl's argv for one context (never the kubeconfig's current one by accident)."""
    return ["kubectl", "--context", context, *args]


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    ui.log.debug("run: %s", " ".join(argv))
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KubeError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s",
                        hint="is the cluster's API server reachable?") from None  # fmt: skip


def check_context(context: str) -> None:
    """kubectl is installed and the kubeconfig has `context`; else one line and a hint."""
    if shutil.which("kubectl") is None:
        raise UsageError("--kube-context needs kubectl, which is not installed", hint=INSTALL_HINT)
    proc = _run(["kubectl", "config", "get-contexts", "-o", "name"], timeout=60)
    contexts = proc.stdout.split()
    if proc.returncode != 0 or context not in contexts:
        known = ", ".join(contexts) if contexts else "none"
        raise UsageError(f"no kube context {context!r} in your kubeconfig (contexts: {known})",
                         hint="kubectl config get-contexts lists them; KUBECONFIG chooses the "
                         "file")  # fmt: skip


def up(spec: PodsSpec, context: str) -> dict[str, Any]:
    """Render, validate and apply the k8s target's manifests to `context`; nothing is left on
    the cluster or here when it fails."""
    if spec.target is not Target.k8s:
        raise ValueError("a Kubernetes cluster takes the k8s target")
    if is_kube(spec.name) or state.cluster_dir(spec.name).exists():
        raise ClusterExists(f"cluster {spec.name!r} already exists",
                            hint=f"gcvm down --name {spec.name}")  # fmt: skip
    check_context(context)
    manifests = render(spec)
    validate(manifests)
    folder = state.cluster_dir(spec.name) / "k8s"
    with ui.step(f"write the manifests into {folder}"):
        write(manifests, folder)
    record = {"name": spec.name, "context": context, "namespace": spec.namespace,
              "manifests": str(folder), "tee": str(spec.tee)}  # fmt: skip
    record_path(spec.name).write_text(json.dumps(record, indent=2) + "\n")
    with ui.step(f"kubectl apply to context {context}"):
        proc = _run(kubectl(context, "apply", "-f", str(folder)))
        if proc.returncode != 0:
            _delete(record)
            shutil.rmtree(state.cluster_dir(spec.name), ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise KubeError(f"kubectl apply to {context} failed: {tail[0]}",
                            hint="what it applied was deleted again; `kubectl --context "
                            f"{context} apply -f {folder}` shows the whole answer")  # fmt: skip
    ui.info(f"applied {len(manifests.files)} objects to {context}, namespace {spec.namespace}")
    if manifests.initdata is not None:
        for line in manifests.initdata.describe():
            ui.info(line)
    return record


def status_lines(name: str) -> list[str]:
    """`gcvm status` of a cluster on Kubernetes: where it was applied, and its pods as kubectl
    reports them (or why it cannot)."""
    record = json.loads(record_path(name).read_text())
    lines = [
        f"cluster {name}: pods on Kubernetes context {record['context']}, namespace "
        f"{record['namespace']}, TEE {record['tee']}, manifests {record['manifests']}"
    ]
    if shutil.which("kubectl") is None:
        return [*lines, f"  (kubectl is not installed: {INSTALL_HINT})"]
    proc = _run(kubectl(record["context"], "get", "pods", "-n", record["namespace"], "-o",
                        "wide"), timeout=60)  # fmt: skip
    said = proc.stdout if proc.returncode == 0 else f"kubectl: {proc.stderr.strip()[-300:]}"
    return [*lines, *(f"  {line}" for line in said.splitlines())]


def _delete(record: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return _run(kubectl(record["context"], "delete", "-f", record["manifests"],
                        "--ignore-not-found=true", "--wait=false"))  # fmt: skip


def down(name: str) -> list[str]:
    """Delete what `up` applied, then the state; safe to repeat."""
    path = record_path(name)
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if shutil.which("kubectl") is None:
        raise UsageError("kubectl is not installed: the cluster's objects cannot be deleted",
                         hint=INSTALL_HINT)  # fmt: skip
    proc = _delete(record)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise KubeError(f"kubectl delete on {record['context']} failed: {said[0]}",
                        hint="the state is kept; run `gcvm down` again once the cluster "
                        "answers")  # fmt: skip
    shutil.rmtree(state.cluster_dir(name), ignore_errors=True)
    ui.info(f"deleted namespace {record['namespace']} and its objects on {record['context']}; "
            f"removed the state of {name}")  # fmt: skip
    return [f"namespace {record['namespace']} on {record['context']}", "state"]
