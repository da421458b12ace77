"""`gcvm up|status|down --runtime pods --kube-context CTX` against a kubectl that records its
argv (no cluster exists here): the manifests applied are the validated k8s target's, every
kubectl call names the context, a failed apply is deleted again and leaves no state, and the
refusals (kubectl missing, an unknown context, a TEE without a KBS, podman-only flags) are one
line each with exit 2 and nothing made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FAKE = """#!/bin/sh
echo "$*" >> "$FAKE_KUBECTL_LOG"
case "$*" in
"config get-contexts -o name") printf 'kind-gcvm\\nprod\\n' ;;
*" apply "*) if [ -n "${FAKE_KUBECTL_FAIL:-}" ]; then
    echo "error: the server could not find the requested resource" >&2; exit 1; fi
  echo "namespace/gcvm-kx created" ;;
*" delete "*) echo 'namespace "gcvm-kx" deleted' ;;
*" get pods "*) echo "NAME READY STATUS"; echo "kx-master0 1/1 Running" ;;
esac
"""


@pytest.fixture
def kube(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE)
    (bin_dir / "kubectl").chmod(0o755)
    return {"GCVM_HOME": str(tmp_path / "home"), "FAKE_KUBECTL_LOG": str(tmp_path / "calls"),
            "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip


def gcvm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)  # fmt: skip


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_KUBECTL_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def said(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join(proc.stderr.split())


def test_up_applies_the_validated_manifests_and_down_deletes_them(kube: dict[str, str]) -> None:
    up = gcvm(kube, "up", "--runtime", "pods", "--kube-context", "kind-gcvm", "--name", "kx",
              "--tee", "tdx", "--kbs", "https://kbs.example:8080", "--masters", "1")  # fmt: skip
    assert up.returncode == 0, up.stderr
    folder = Path(kube["GCVM_HOME"]) / "state" / "clusters" / "kx" / "k8s"
    assert calls(kube) == ["config get-contexts -o name",
                           f"--context kind-gcvm apply -f {folder}"]  # fmt: skip
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in folder.glob("*.yaml")}
    assert {"Namespace", "Pod", "Service"} <= kinds
    master = next(yaml.safe_load(p.read_text()) for p in folder.glob("*master0*.yaml"))
    assert master["spec"]["runtimeClassName"] == "kata-qemu-tdx"
    assert "initdata" in said(up) or "mr_config_id" in said(up)
    status = gcvm(kube, "status", "--name", "kx")
    assert status.returncode == 0 and "kind-gcvm" in status.stdout and "kx-master0" in status.stdout
    down = gcvm(kube, "down", "--name", "kx")
    assert down.returncode == 0, down.stderr
    assert calls(kube)[-1] == (f"--context kind-gcvm delete -f {folder} "
                               "--ignore-not-found=true --wait=false")  # fmt: skip
    assert not (Path(kube["GCVM_HOME"]) / "state" / "clusters" / "kx").exists()
    again = gcvm(kube, "down", "--name", "kx")
    assert again.returncode == 0


def test_a_failed_apply_is_deleted_again_and_leaves_no_state(kube: dict[str, str]) -> None:
    up = gcvm({**kube, "FAKE_KUBECTL_FAIL": "1"}, "up", "--runtime", "pods", "--kube-context",
              "prod", "--name", "kx")  # fmt: skip
    assert up.returncode == 1 and "could not find the requested resource" in said(up)
    assert "Traceback" not in up.stderr
    assert [c.split(" -f ")[0] for c in calls(kube)] == [
        "config get-contexts -o name",
        "--context prod apply",
        "--context prod delete",
    ]
    assert not (Path(kube["GCVM_HOME"]) / "state" / "clusters" / "kx").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--kube-context", "nosuch"],
            "no kube context 'nosuch' in your kubeconfig (contexts: kind-gcvm, prod)",
        ),
        (["--kube-context", "prod", "--tee", "sev-snp"], "pods need --kbs URL"),
        (["--kube-context", "prod", "--broker"], "attest to a KBS"),
        (["--kube-context", "prod", "--subnet", "10.9.0.0/24"], "assigns pod addresses"),
        (["--kbs", "https://kbs.example"], "--kbs is for --kube-context"),
    ],
)
def test_refusals_make_nothing(kube: dict[str, str], args: list[str], fragment: str) -> None:
    proc = gcvm(kube, "up", "--runtime", "pods", "--name", "kx", *args)
    assert proc.returncode == 2 and fragment in said(proc), proc.stderr
    assert not any(" apply " in f" {c} " for c in calls(kube))
    assert not (Path(kube["GCVM_HOME"]) / "state" / "clusters" / "kx").exists()


def test_without_kubectl(kube: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**kube, "PATH": f"{empty}:/usr/sbin:/sbin"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "up", "--runtime", "pods",
                           "--kube-context", "prod", "--name", "kx"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "apt-get install kubernetes-client" in said(proc)


def test_vms_refuse_kube_flags(kube: dict[str, str]) -> None:
    proc = gcvm(kube, "up", "--kube-context", "prod", "--name", "kx")
    assert proc.returncode == 2 and "are for --runtime pods" in said(proc)
