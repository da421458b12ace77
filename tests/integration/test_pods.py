"""`gcvm up --runtime pods` for real: one podman pod per rank in the cluster's own network
namespace, `gcvm run bench` across them, `gcvm down`; then nothing may be left behind.

The first run on a host makes the container image from the guest image (about a minute and a
half here, cached under GCVM_CACHE); afterwards `up` takes seconds and the bench about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import netns, state
from tests.integration.conftest import Env, assert_nothing_left, cluster_name

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture
def podman_host(gcvm_env: Env) -> Env:
    missing = [t for t in ("podman", "runc", "nsenter", "debugfs") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the pods runtime needs {', '.join(missing)} (apt-get install podman runc)")
    return gcvm_env


def test_pods_up_bench_down(podman_host: Env, tmp_path: Path) -> None:
    name = cluster_name()
    ns = f"gcvm-{name}"
    up = podman_host.gcvm("up", "--runtime", "pods", "--tee", "none", "--masters", "1",
                          "--workers", "1", "--name", name, timeout=900)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        record = json.loads((state.cluster_dir(name) / "pods.json").read_text())
        assert record["phase"] == "ready" and len(record["pods"]) == 2
        # every pod address routes to the namespace's own bridge, and the namespace routes
        # nothing else (asked of the kernel, no packet sent)
        for pod in record["pods"]:
            route = subprocess.run(["ip", "-n", ns, "route", "get", pod["address"]],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
            assert " dev cni-podman" in route
        table = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        assert "default" not in table
        # the code came in as a wheel (podman cp), not as a mounted host folder
        inspect = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "podman", "inspect", "--format",
             "{{json .Mounts}}", f"{name}-master0-master"], capture_output=True, text=True,
            env={**podman_host.env, **_podman_env(name)}, check=True)  # fmt: skip
        assert all("/work" not in m.get("Source", "") for m in json.loads(inspect.stdout))
        out = tmp_path / "results"
        bench = podman_host.gcvm(
            "run", "bench", "--name", name, "--model", "seed-transformer", "--batch", "1",
            "--seq", "16", "--repeat", "2", "--warmup", "0", "--modes",
            "plain-offload,groupcover", "--no-audit", "--out", str(out), timeout=900)  # fmt: skip
        assert bench.returncode == 0, bench.stderr[-3000:] + bench.stdout[-3000:]
        document = json.loads(next(out.rglob("bench.json")).read_text())
        rows = [r for run in document["runs"].values() for r in run["results"]]
        assert {r["mode"] for r in rows} == {"plain-offload", "groupcover"}
        assert all(r["rel_err"] is not None and r["rel_err"] < 1e-3 for r in rows)
    finally:
        down = podman_host.gcvm("down", "--name", name)
    assert down.returncode == 0, down.stderr[-2000:]
    assert not netns.exists(ns)
    assert not Path(f"/var/lib/cni/networks/{ns}").exists()
    assert_nothing_left(name)


def _podman_env(name: str) -> dict[str, str]:
    root = state.cluster_dir(name) / "podman"
    return {"CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}  # fmt: skip
