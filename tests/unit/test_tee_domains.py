"""The TDX and SEV-SNP domains gcvm renders for a measured direct boot, beside their references:
canonical/tdx's TD definition (tests/fixtures/canonical-tdx), libvirt's current schema (stored,
tests/fixtures/libvirt-schema) and the system's libvirt 9.0 schema, which predates both TEEs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from orchestrator import render
from orchestrator.attest.reference import reference_policy
from orchestrator.spec import Role, Tee
from orchestrator.tee.base import TeeOptions
from tests import schema
from tests.unit.test_render import inputs_for, rendered, vms_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CANONICAL = FIXTURES / "canonical-tdx" / "trust_domain.xml.template"
LOCAL_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def tree(xml: str | bytes) -> etree._Element:
    return etree.fromstring(xml.encode() if isinstance(xml, str) else xml)


def what_makes_a_td(root: etree._Element) -> dict[str, object]:
    """The elements a TD needs to boot, as comparable values."""
    loader = root.find("os/loader")
    backing = root.find("memoryBacking")
    return {
        "domain type": root.get("type"),
        "machine": root.find("os/type").get("machine").split("-")[-1],  # pc-q35-x.y -> q35
        "loader": (loader.get("type"), loader.get("readonly")),
        "firmware autoselection": root.find("os").get("firmware"),
        "cpu mode": root.find("cpu").get("mode"),
        "split irqchip": root.find("features/ioapic").get("driver"),
        "memory backing": (
            backing.find("source").get("type"),
            backing.find("access").get("mode"),
            backing.find("locked"),
        ),
        "launchSecurity": root.find("launchSecurity").get("type"),
        "policy": root.findtext("launchSecurity/policy"),
        "VNC": root.find("devices/graphics"),
    }


def test_tdx_domain_matches_canonical_tdx_where_it_matters() -> None:
    canonical = what_makes_a_td(tree(CANONICAL.read_bytes()))
    ours = tree(rendered("tdx", Role.master))
    assert what_makes_a_td(ours) == canonical
    # ... and where gcvm differs on purpose (the README beside the fixture says why)
    assert (
        ours.findtext("os/kernel") and ours.findtext("os/cmdline") and ours.find("os/boot") is None
    )
    assert ours.find("os/loader").text.endswith("OVMF.inteltdx.fd")  # the built-in host's TDVF
    assert ours.findtext("on_reboot") == "destroy"
    assert ours.find("features/smm").get("state") == "off"  # TDVF runs without SMM


def test_tdx_optional_launch_values() -> None:
    vm = next(v for v in vms_for(Tee.tdx) if v.role is Role.master)
    config_id = "A" * 64  # base64 of 48 bytes
    options = TeeOptions(tdx_mr_config_id=config_id, tdx_qgs_socket=Path("/run/tdx-qgs/qgs.sock"))
    inputs = inputs_for(Tee.tdx, render.Accel.kvm)
    xml = render.render_domain(vm, render.RenderInputs(**{**inputs.__dict__, "options": options}))
    root = tree(xml)
    assert root.findtext("launchSecurity/mrConfigId") == config_id
    assert root.find("launchSecurity/quoteGenerationService").get("path") == (
        "/run/tdx-qgs/qgs.sock"
    )
    assert schema.validate(xml, schema.stored().domain) == []


def test_snp_domain_for_a_measured_direct_boot() -> None:
    root = tree(rendered("sev-snp", Role.worker))
    ls = root.find("launchSecurity")
    assert (ls.get("type"), ls.get("kernelHashes"), ls.findtext("policy")) == (
        "sev-snp",
        "yes",
        "0x00030000",
    )
    loader = root.find("os/loader")
    assert (loader.get("type"), loader.get("stateless"), loader.text.split("/")[-1]) == (
        "rom",
        "yes",
        "OVMF.amdsev.fd",
    )
    assert [root.findtext(f"os/{e}") is not None for e in ("kernel", "initrd", "cmdline")] == [
        True
    ] * 3


def test_snp_policy_and_the_reference_policy_agree() -> None:
    """The guest policy in the domain is the one `gcvm attest policy` pins: 0x30000 (SMT allowed,
    reserved bit 17 set, no debug, no migration agent)."""
    assert TeeOptions().snp_policy == 0x30000
    default = reference_policy.__kwdefaults__ or {}
    assert default.get("snp_policy", TeeOptions.snp_policy) == TeeOptions().snp_policy


@pytest.mark.parametrize("scenario", ["tdx", "tdx-shared", "sev-snp"])
@pytest.mark.parametrize("role", [Role.master, Role.worker])
def test_every_tee_domain_validates_against_current_libvirt(scenario: str, role: Role) -> None:
    assert schema.validate(rendered(scenario, role), schema.stored().domain) == []


@pytest.mark.skipif(not LOCAL_SCHEMA.exists(), reason="no system libvirt schema")
@pytest.mark.parametrize("scenario", ["tdx", "sev-snp"])
def test_the_system_libvirt_9_schema_rejects_tee_domains(scenario: str, tmp_path: Path) -> None:
    """Why the current schema is stored: libvirt 9.0's schema knows neither TEE, and only the
    launchSecurity element makes the difference."""
    xml = rendered(scenario, Role.master)
    assert schema.validate(xml, LOCAL_SCHEMA)
    root = tree(xml)
    root.remove(root.find("launchSecurity"))
    plain = etree.tostring(root).decode()
    assert schema.validate(plain, LOCAL_SCHEMA) == []
    if shutil.which("virt-xml-validate"):
        path = tmp_path / "d.xml"
        path.write_text(xml)
        done = subprocess.run(["virt-xml-validate", str(path)], capture_output=True, text=True)
        assert done.returncode != 0


@pytest.mark.parametrize("tee", ["tdx", "sev-snp"])
def test_gcvm_render_gives_a_tee_cluster_locked_masters(tee: str, tmp_path: Path) -> None:
    """`gcvm render --tee X` writes what `up` boots: locked masters (their code disk attached
    read-only, `gcvm.locked=1` and its root hash in the measured command line), workers as they
    were; every domain valid against libvirt's current schema."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "orchestrator", "render", "--tee", tee, "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "code.img").is_file()
    for path in sorted(out.glob("*.xml")):
        if path.name == "network.xml":
            continue
        xml = path.read_text()
        assert schema.validate(xml, schema.stored().domain) == [], path.name
        root = ET.fromstring(xml)
        words = (root.findtext("./os/cmdline") or "").split()
        sources = [d.find("source").get("file") for d in root.findall("./devices/disk")]  # type: ignore[union-attr]
        if "master" in path.name:
            assert "gcvm.locked=1" in words and any(w.startswith("gcvm.code=") for w in words)
            assert str(out / "code.img") in sources
        else:
            assert "gcvm.locked=1" not in words and str(out / "code.img") not in sources
