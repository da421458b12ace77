"""`gcvm up --runtime pods --broker` for real: one podman pod per rank in the cluster's own
network namespace and the owner's key broker on the pods' bridge; `gcvm run bench` from model
packages (protected and signed on the host, keys released by the broker over its pinned HTTPS
identity, the payload audit watching), `gcvm run seed` from packages, `gcvm down`; then nothing
may be left behind.

The first run on a host makes the container image from the guest image (about a minute and a
half here, cached under GCVM_CACHE); afterwards `up` takes seconds and each run under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator import netns, state
from tests.integration.conftest import Env, Running, assert_nothing_left, cluster_name

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
                          "--workers", "1", "--broker", "--name", name, timeout=900)  # fmt: skip
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
        status = podman_host.gcvm("status", "--name", name)
        assert "key broker: running" in status.stdout, status.stdout
        top = podman_host.gcvm("top", "--name", name, "--once", "--interval", "0.2")
        assert top.returncode == 0 and f"{name}-worker0" in top.stdout, top.stdout + top.stderr
        logs = podman_host.gcvm("logs", "worker0", "--name", name)
        assert logs.returncode == 0, logs.stderr
        out = tmp_path / "results"
        bench = podman_host.gcvm(
            "run", "bench", "--name", name, "--model", "minilm-standin", "--batch", "1",
            "--seq", "16", "--repeat", "2", "--warmup", "0", "--modes", "groupcover,hardened",
            "--audit", "--out", str(out), timeout=900)  # fmt: skip
        assert bench.returncode == 0, bench.stderr[-3000:] + bench.stdout[-3000:]
        document = json.loads(next(out.rglob("bench.json")).read_text())
        seed = podman_host.gcvm("run", "seed", "--name", name, "--model", "minilm-standin",
                                "--set", "MODES=groupcover", "--set", "BATCH=1", "--set",
                                "SEQ=16", "--set", "REPEAT=2", timeout=900)  # fmt: skip
    finally:
        down = podman_host.gcvm("down", "--name", name)
    assert down.returncode == 0, down.stderr[-2000:]
    assert not netns.exists(ns)
    assert not Path(f"/var/lib/cni/networks/{ns}").exists()
    assert "key broker" in down.stderr + down.stdout
    assert_nothing_left(name)

    # each pod's CPU and memory over the run, from its cgroup
    resources = document["resources"]
    assert set(resources) == {p["name"] for p in record["pods"]}, resources
    for pod, usage in resources.items():
        assert usage["kind"] == "pod" and usage["samples"] >= 2, (pod, usage)
        assert usage["cpu_mean_cores"] > 0 and usage["cpu_peak_cores"] > 0, (pod, usage)
        assert usage["mem_peak_mib"] > 0, (pod, usage)
    assert "Resources over the run (per pod)" in bench.stdout
    # the model from packages: every mode within 1e-4 of the plaintext model, the audit clean
    rows = [r for run in document["runs"].values() for r in run["results"]]
    assert {r["mode"] for r in rows} == {"groupcover", "hardened"}
    assert all(r["rel_err"] is not None and r["rel_err"] <= 1e-4 for r in rows), rows
    for r in rows:
        assert r["audit"]["leaks"] == [] and not r["audit"]["input_exposed"], r["audit"]
        assert r["audit"]["audited_calls"] > 0
    # the key from the cluster's broker, over HTTPS, the broker and packages authenticated by
    # the pins the master was given (not measured in a runc container), and the results say so
    assert document["broker"]["url"].startswith("https://")
    assert "--repository" in document["broker"]["argv"]  # the cluster's broker, not a run's
    release = document["key_release"][f"{name}-master0"]
    assert release["source"] == "broker" and release["broker_authenticated"] is True
    assert release["package_authenticated"] is True and not release["attested"]
    assert release["broker_identity"]["source"] == "command line (not measured)"
    assert document["attestation"][f"{name}-master0"]  # the broker's own record, per master
    copies = {(c["vm"], c["package_id"]): c["copied"] for c in document["packages"]["copies"]}
    assert all("model.key" not in files for files in copies.values())
    assert {len(files) for (pod, _), files in copies.items() if "worker" in pod} == {2}
    # the seed's scripts, from a package, the key released by the same broker
    assert seed.returncode == 0, seed.stderr[-3000:] + seed.stdout[-3000:]
    said = seed.stdout + seed.stderr  # the ranks' lines go to the console (stderr)
    assert "minilm-standin groupcover: rank 0 -> worker1" in said, said[-3000:]
    assert "rel err" in said and "model key released without attestation" in said


# `up`'s steps, and how the interrupt comes: to the whole process group as a terminal's Ctrl-C
# (podman and pip get it too), or to gcvm alone
INTERRUPTS = [("play \\d+ pods", True, 0.0), ("install .* into \\d+ pods", False, 0.3),
              ("start the key broker", True, 0.1)]  # fmt: skip


@pytest.mark.parametrize(("phase", "group", "delay"), INTERRUPTS)
def test_ctrl_c_during_pods_up_leaves_nothing(podman_host: Env, phase: str, group: bool,
                                              delay: float) -> None:  # fmt: skip
    name = cluster_name()
    before = _podman_netns()
    up = Running(podman_host, "up", "--runtime", "pods", "--tee", "none", "--broker", "--name",
                 name, session=True)  # fmt: skip
    try:
        up.wait_for(phase)
        time.sleep(delay)
        (up.signal_group if group else up.signal)(signal.SIGINT)
        rc = up.finish(timeout=120)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc == 130, up.text
    assert "interrupted; the cluster was removed" in up.text and "Traceback" not in up.text
    ns = f"gcvm-{name}"
    assert not netns.exists(ns)
    assert not Path(f"/var/lib/cni/networks/{ns}").exists()
    assert _podman_netns() <= before  # podman's per-pod namespaces went with the pods
    assert_nothing_left(name)  # before any `gcvm down`
    down = podman_host.gcvm("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)


def test_sigkill_of_podman_during_pods_up_leaves_nothing(podman_host: Env) -> None:
    """podman itself (`podman kube play`) killed mid-way: `up` fails with one line and a hint,
    removes what podman had made, and `down` afterwards is safe."""
    name = cluster_name()
    before = _podman_netns()
    up = Running(podman_host, "up", "--runtime", "pods", "--tee", "none", "--name", name)
    try:
        up.wait_for("play \\d+ pods")
        play = _wait_for_child(up.proc.pid, b"kube\0play")
        # mid-way: once podman has given the first pod its network namespace (and a CNI lease)
        deadline = time.monotonic() + 60
        while not _podman_netns() - before and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(play, signal.SIGKILL)  # ProcessLookupError: podman was done already
        rc = up.finish(timeout=120)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc == 1, up.text
    assert "was killed by SIGKILL" in up.text and "hint:" in up.text, up.text
    assert "Traceback" not in up.text
    ns = f"gcvm-{name}"
    assert not netns.exists(ns)
    assert not Path(f"/var/lib/cni/networks/{ns}").exists()
    assert _podman_netns() <= before
    assert_nothing_left(name)
    down = podman_host.gcvm("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)


def _wait_for_child(ancestor: int, needle: bytes, timeout: float = 60) -> int:
    """The pid of a descendant of `ancestor` whose command line holds `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "cmdline").read_bytes() and _descends(
                    int(entry.name), ancestor
                ):
                    return int(entry.name)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} under pid {ancestor} in {timeout:.0f} s")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _podman_netns() -> set[str]:
    folder = Path("/run/netns")
    return {p.name for p in folder.glob("netns-*")} if folder.is_dir() else set()


def _podman_env(name: str) -> dict[str, str]:
    root = state.cluster_dir(name) / "podman"
    return {"CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}  # fmt: skip
