"""The whole flow, for real: `gcvm up` boots a master and a worker (no TEE; TCG here), `gcvm run
bench` runs MiniLM with its real weights under GroupCover across the two VMs over the default
tensor-only wire, and `gcvm down` leaves nothing behind.

Sizes are small because TCG runs torch at about 0.1-0.3 GFLOP/s: the point is exactness across
real VMs and the absence of secrets on the wire, not speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import Env, assert_nothing_left, cluster_name

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_minilm_groupcover_across_vms(gcvm_env: Env, tmp_path: Path) -> None:
    name = cluster_name()
    out = tmp_path / "results"
    up = gcvm_env.gcvm("up", "--tee", "none", "--workers", "1", "--name", name)
    try:
        assert up.returncode == 0, up.stderr
        bench = gcvm_env.gcvm(
            "run",
            "bench",
            "--name",
            name,
            "--model",
            "minilm",
            "--modes",
            "plain-offload,groupcover",
            "--batch",
            "1",
            "--seq",
            "8",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
            timeout=1800,
        )
        assert bench.returncode == 0, bench.stderr[-3000:]
    finally:
        down = gcvm_env.gcvm("down", "--name", name, timeout=180)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)

    # the table went to stdout; the document, its JSON and chart to --out
    assert "groupcover" in bench.stdout and "vs plain-offload" in bench.stdout
    [run_dir] = list(out.iterdir())
    doc = json.loads((run_dir / "bench.json").read_text())
    assert (run_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"

    vms = {vm["name"]: vm for vm in doc["cluster"]["vms"]}
    assert {vm["role"] for vm in vms.values()} == {"master", "worker"}
    assert all(vm["tee"] == "none" and vm["tee_verified"] == "none" for vm in vms.values())
    assert doc["cluster"]["host"]["accel"] in ("kvm", "tcg")

    [(master, run)] = doc["runs"].items()
    assert vms[master]["role"] == "master"
    results = {r["mode"]: r for r in run["results"]}
    assert set(results) == {"plain-offload", "groupcover"}
    # the master ran on another machine than the worker it offloaded to
    assert run["host"]["hostname"] == master
    for mode, r in results.items():
        assert (r["model"], r["batch"], r["seq"]) == ("minilm", 1, 8)
        assert r["rel_err"] <= 1e-4, (mode, r["rel_err"])
        assert r["cosine_min"] >= 0.99999, (mode, r["cosine_min"])
        assert r["latency_ms"]["median"] > 0 and r["throughput"] > 0
        assert r["rpc_calls"] > 0  # every linear layer really went to the worker
    # the default transport carried it: tensors only, every reply checked
    assert run["settings"]["transport"] == "tcp" and "transport_warning" not in run["settings"]
    assert run["settings"]["seed"] is None and "OS CSPRNG" in run["settings"]["secrets"]
    audit = results["groupcover"]["audit"]
    assert audit["payloads"] > 0 and audit["bytes"] > 0
    assert audit["leaks"] == [], audit["leaks"]
    assert audit["input_exposed"] is False and audit["leakage"]
    # the audit is not blind: plain offload publishes the plaintext weights, by design
    assert results["plain-offload"]["audit"]["leaks"]
