"""`gcvm doctor` and `gcvm render` end to end, as a user runs them (a subprocess each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from orchestrator import hostcaps, render

FIXTURES = Path(__file__).parent / "fixtures"


def gcvm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture(scope="module")
def doctor_here() -> subprocess.CompletedProcess[str]:
    return gcvm("doctor")


def _row(output: str, fact: str) -> str:
    return next(line for line in output.splitlines() if f" {fact} " in line)


def test_doctor_here(doctor_here: subprocess.CompletedProcess[str]) -> None:
    out = doctor_here.stdout
    assert doctor_here.returncode == 0, doctor_here.stderr
    assert "Traceback" not in doctor_here.stderr
    caps = hostcaps.probe_qemu(kvm_probe=False)  # the cached answer doctor just wrote
    assert ("ready (TCG" in out) == (not caps.kvm_usable)
    assert " KVM usable " in out and " TCG available " in out
    if Path("/dev/kvm").exists():
        assert " ok " in _row(out, "KVM present")
    assert " ok " in _row(out, "TCG available")
    verdicts = {
        line.split()[1]: line
        for line in out.splitlines()
        if line.startswith("│ ") and line.split()[1] in ("none", "tdx", "sev-snp")
    }
    assert "ready" in verdicts["none"]
    for tee_, supported in (("tdx", caps.tdx.supported), ("sev-snp", caps.snp.supported)):
        assert ("cannot run" in verdicts[tee_]) == (not supported or not caps.kvm_usable)


def test_doctor_on_this_machine_says_what_the_design_note_says(
    doctor_here: subprocess.CompletedProcess[str],
) -> None:
    """This project's machines: no TDX, no SNP, KVM present but unusable, TCG available."""
    caps = hostcaps.probe_qemu(kvm_probe=False)
    if caps.kvm_usable or not caps.kvm_present:
        pytest.skip("not one of the project's nested-KVM machines")
    out = doctor_here.stdout
    assert " no " in _row(out, "KVM usable")
    assert "did not finish" in _row(out, "KVM usable")
    assert "ready (TCG: software emulation" in out
    assert "TDX launch security: not offered" in out
    assert "SEV-SNP launch security: not offered" in out


def test_doctor_refuses_a_tee_the_host_lacks() -> None:
    caps = hostcaps.probe_qemu(kvm_probe=False)
    if caps.tdx.supported and caps.kvm_usable:
        pytest.skip("this host runs TDX")
    proc = gcvm("doctor", "--tee", "tdx")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "cannot run --tee tdx" in proc.stderr
    assert "--tee none" in proc.stderr
    assert "TDX launch security" in proc.stderr


def test_doctor_with_an_unreachable_uri() -> None:
    proc = gcvm("doctor", "--connect", "qemu+unix:///system?socket=/nonexistent/sock")
    assert proc.returncode == 2
    assert "cannot connect to libvirt" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tee_", ["none", "tdx", "sev-snp"])
def test_render_four_workers(tee_: str, tmp_path: Path) -> None:
    proc = gcvm(
        "render",
        "--tee",
        tee_,
        "--workers",
        "4",
        "--out",
        str(tmp_path),
        env={"GCVM_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    domains = sorted(p for p in tmp_path.glob("*.xml") if p.name != "network.xml")
    assert [p.stem for p in domains] == ["gcvm-master0", *(f"gcvm-worker{i}" for i in range(4))]
    for path in domains:
        root = etree.parse(str(path)).getroot()
        assert root.findtext("vcpu") == "1"
        assert (root.find("memory").get("unit"), root.findtext("memory")) == ("MiB", "2048")
        ls = root.find("launchSecurity")
        if tee_ == "none":
            assert ls is None
        else:
            assert ls is not None and ls.get("type") == tee_
    if tee_ != "none":
        assert "built-in" in proc.stderr  # says which host it rendered against
    network = etree.parse(str(tmp_path / "network.xml")).getroot()
    assert len(network.findall("ip/dhcp/host")) == 5


def test_render_with_captured_caps_and_worker_tee(tmp_path: Path) -> None:
    caps_file = render.BUILTIN_HOSTS_DIR / "sev-snp-host.domcaps.xml"
    proc = gcvm(
        "render",
        "--tee",
        "sev-snp",
        "--worker-tee",
        "none",
        "--workers",
        "2",
        "--host-caps",
        str(caps_file),
        "--name",
        "mix",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    kinds = {
        p.stem: etree.parse(str(p)).getroot().find("launchSecurity")
        for p in tmp_path.glob("mix-*.xml")
    }
    assert kinds["mix-master0"] is not None and kinds["mix-master0"].get("type") == "sev-snp"
    assert kinds["mix-worker0"] is None and kinds["mix-worker1"] is None


def test_render_snp_against_a_plain_capture_is_refused(tmp_path: Path) -> None:
    proc = gcvm(
        "render",
        "--tee",
        "sev-snp",
        "--host-caps",
        str(FIXTURES / "domcaps-plain-debian12.xml"),
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 2
    assert "cbitpos" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--vcpus", "0"], "--vcpus must be at least 1"),
        (["--memory", "512"], "too small"),
        (["--name", "Bad_Name"], "invalid cluster name"),
        (["--tee", "sgx"], "'none', 'tdx', 'sev-snp'"),
        (["--tee", "tdx", "--worker-tee", "sev-snp"], "mixes two vendors"),
        (["--host-caps", "/nonexistent/caps.xml", "--tee", "tdx"], "cannot read --host-caps"),
    ],
)
def test_bad_values_exit_2_without_traceback(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = gcvm("render", *args, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.xml"))
