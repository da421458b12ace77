"""Confidential guests for real: `gcvm up --tee tdx|sev-snp` on a host that has the TEE, with a
guest image whose kernel supports it, and the guest's own report of its TEE state.

These need hardware this project's CI does not have; they skip with the host's reasons. On a TDX
or SNP host, point GCVM_TEE_IMAGE at a guest image with a TDX/SNP-capable kernel (e.g. Ubuntu
24.04's cloud image) and GCVM_CONNECT at the host's libvirt (default qemu:///system).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from orchestrator import hostcaps, state

CONNECT = os.environ.get("GCVM_CONNECT")  # None: the host's qemu:///system if it answers


def _require(tee: str) -> str:
    caps = hostcaps.detect(CONNECT, kvm_probe=False)
    support = caps.tdx if tee == "tdx" else caps.snp
    if not support.supported:
        pytest.skip(f"this host cannot run {tee} guests: {'; '.join(support.reasons)}")
    image = os.environ.get("GCVM_TEE_IMAGE")
    if not image:
        pytest.skip(f"set GCVM_TEE_IMAGE to a guest image whose kernel supports {tee}")
    return image


def _gcvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=1800
    )


@pytest.mark.parametrize(
    "tee",
    [pytest.param("tdx", marks=pytest.mark.tdx), pytest.param("sev-snp", marks=pytest.mark.snp)],
)
def test_confidential_master_reports_its_tee(tee: str) -> None:
    image = _require(tee)
    name = f"hw{uuid.uuid4().hex[:6]}"
    connect = ["--connect", CONNECT or "qemu:///system"]
    up = _gcvm(
        "up",
        "--tee",
        tee,
        "--worker-tee",
        "none",
        "--workers",
        "1",
        "--name",
        name,
        *connect,
        "--image",
        image,
    )
    try:
        assert up.returncode == 0, up.stderr
        st = state.load(name)
        master = next(vm for vm in st.vms if vm.role == "master")
        assert master.tee_verified == tee, master.tee_evidence
        bench = _gcvm(
            "run",
            "bench",
            "--name",
            name,
            "--model",
            "minilm",
            "--batch",
            "1",
            "--seq",
            "16",
            "--repeat",
            "2",
        )
        assert bench.returncode == 0, bench.stderr
    finally:
        _gcvm("down", "--name", name, *connect)
