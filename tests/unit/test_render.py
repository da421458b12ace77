"""Domain and network XML: golden files per (TEE x scenario), compared structurally; every golden
validated against a current libvirt schema, the no-TEE ones also defined on libvirt's
test:///default driver with VIR_DOMAIN_DEFINE_VALIDATE and checked by virt-xml-validate.
`pytest --regen-golden` rewrites the golden files."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from lxml import etree

from orchestrator import render, tee
from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps import HostCaps, KvmProbe
from orchestrator.spec import Accel, ClusterSpec, Role, Tee, VmSpec, plan_vms
from tests import schema

GOLDEN = Path(__file__).parent / "golden"
FIXTURES = Path(__file__).parent / "fixtures"
CLUSTER_DIR = Path("/var/lib/gcvm/clusters/demo")
SUBNET = "192.168.122.0/24"  # explicit: the goldens keep one address plan
IMAGE = Path("/var/cache/gcvm/images/0123456789abcdef")
CMDLINE = "root=/dev/mapper/gcvm-root ro console=ttyS0 fsck.mode=skip"


def plain_caps(kvm_usable: bool) -> HostCaps:
    reason = "a test guest reached long mode" if kvm_usable else "a test guest did not finish"
    return HostCaps.from_domcaps_xml(
        (FIXTURES / "domcaps-plain-debian12.xml").read_text(), kvm=KvmProbe(kvm_usable, reason)
    )


def caps_for(tee_: Tee, accel: Accel) -> HostCaps:
    if tee_ is Tee.none:
        return plain_caps(accel is Accel.kvm)
    return render.BUILTIN_HOSTS[tee_].caps()


def inputs_for(tee_: Tee, accel: Accel, run_as: str | None = None) -> render.RenderInputs:
    return render.RenderInputs(
        caps=caps_for(tee_, accel),
        accel=accel,
        kernel=IMAGE / "vmlinuz",
        initrd=IMAGE / "initrd.img",
        cmdline=CMDLINE,
        network="gcvm-demo",
        run_as=run_as,
        root_readonly=True,  # gcvm's image: a dm-verity root
    )


def vms_for(tee_: Tee, workers: int = 1) -> list[VmSpec]:
    return plan_vms(ClusterSpec(name="demo", tee=tee_, workers=workers, subnet=SUBNET), CLUSTER_DIR)


SHARED_DAEMON_USER = "libvirt-qemu:kvm"  # --connect: QEMU's user in a per-domain DAC seclabel
SCENARIOS: dict[str, tuple[Tee, Accel, str | None]] = {
    "none-tcg": (Tee.none, Accel.tcg, None),
    "none-kvm": (Tee.none, Accel.kvm, None),
    "none-kvm-shared": (Tee.none, Accel.kvm, SHARED_DAEMON_USER),
    "tdx": (Tee.tdx, Accel.kvm, None),
    "tdx-shared": (Tee.tdx, Accel.kvm, SHARED_DAEMON_USER),
    "sev-snp": (Tee.sev_snp, Accel.kvm, None),
}
CASES = [
    (f"{scenario}-{role}", scenario, role)
    for scenario in SCENARIOS
    for role in (Role.master, Role.worker)
]


def rendered(scenario: str, role: Role) -> str:
    tee_, accel, run_as = SCENARIOS[scenario]
    vm = next(v for v in vms_for(tee_) if v.role is role)
    return render.render_domain(vm, inputs_for(tee_, accel, run_as))


def canonical(xml: str | bytes) -> str:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)
    return etree.tostring(root, method="c14n").decode().replace("><", ">\n<")


def check_golden(name: str, xml: str, request: pytest.FixtureRequest) -> None:
    path = GOLDEN / f"{name}.xml"
    if request.config.getoption("--regen-golden"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(xml)
    assert path.exists(), f"{path} missing: run pytest --regen-golden"
    want, got = canonical(path.read_text()), canonical(xml)
    if want != got:
        diff = "\n".join(
            difflib.unified_diff(
                want.splitlines(), got.splitlines(), str(path), "rendered", lineterm=""
            )
        )
        pytest.fail(f"{name} differs from its golden file:\n{diff}")


@pytest.mark.parametrize(("name", "scenario", "role"), CASES, ids=[c[0] for c in CASES])
def test_domain_golden(
    name: str, scenario: str, role: Role, request: pytest.FixtureRequest
) -> None:
    check_golden(name, rendered(scenario, role), request)


def test_network_golden(request: pytest.FixtureRequest) -> None:
    spec = ClusterSpec(name="demo", workers=4, subnet=SUBNET)
    check_golden("network", render.render_network(spec, plan_vms(spec, CLUSTER_DIR)), request)


def test_rendering_is_pure() -> None:
    for scenario in SCENARIOS:
        assert rendered(scenario, Role.worker) == rendered(scenario, Role.worker)


def test_golden_files_are_exactly_the_cases() -> None:
    assert {p.stem for p in GOLDEN.glob("*.xml")} == {c[0] for c in CASES} | {"network"}


# --- schema validation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def current_schema() -> schema.Schemas:
    """libvirt 12.8's schema, stored in the repository (the system's 9.0 predates TDX and SNP):
    refresh it from `schema.fetch()` when libvirt changes its launchSecurity elements."""
    return schema.stored()


def golden_files() -> list[Path]:
    return sorted(GOLDEN.glob("*.xml"))


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden_validates_against_current_libvirt_schema(
    path: Path, current_schema: schema.Schemas
) -> None:
    rng = current_schema.network if path.stem == "network" else current_schema.domain
    assert schema.validate(path.read_text(), rng) == []


def test_schema_rejects_an_unknown_launch_security_element(
    current_schema: schema.Schemas,
) -> None:
    bad = (GOLDEN / "tdx-worker.xml").read_text().replace("<policy>", "<nonsense/><policy>")
    assert schema.validate(bad, current_schema.domain)


def test_schema_mirror_comes_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/x.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: s\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    )
    assert schema.mirror_uri(tmp_path / "d", tmp_path / "none") == "http://mirror.example/debian"
    (tmp_path / "list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert schema.mirror_uri(tmp_path / "empty", tmp_path / "list") == (
        "http://other.example/debian"
    )


NO_TEE_GOLDENS = [p for p in golden_files() if p.stem.startswith("none-")]


@pytest.mark.parametrize("path", NO_TEE_GOLDENS, ids=lambda p: p.stem)
def test_no_tee_golden_defines_on_libvirt_test_driver(path: Path) -> None:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(path.read_text(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            assert dom.name() in path.read_text()
            back = dom.XMLDesc(0)
            assert render.parse_metadata(back) == render.parse_metadata(path.read_text())
        finally:
            dom.undefine()
    finally:
        conn.close()


@pytest.mark.parametrize("path", [*NO_TEE_GOLDENS, GOLDEN / "network.xml"], ids=lambda p: p.stem)
def test_no_tee_golden_passes_virt_xml_validate(path: Path) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate not installed (libvirt-clients)")
    proc = subprocess.run(["virt-xml-validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_test_driver_rejects_an_unknown_element() -> None:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    bad = (GOLDEN / "none-tcg-worker.xml").read_text().replace("<clock", "<nonsense/><clock")
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.defineXMLFlags(bad, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    finally:
        conn.close()


# --- the shapes the design note gives -----------------------------------------------------


def tree(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def launch_security(xml: str) -> str:
    node = tree(xml).find("launchSecurity")
    assert node is not None
    return canonical(etree.tostring(node))


def test_tdx_shape() -> None:
    root = tree(rendered("tdx", Role.worker))
    assert launch_security(rendered("tdx", Role.worker)) == canonical(
        "<launchSecurity type='tdx'><policy>0x10000000</policy></launchSecurity>"
    )
    assert root.get("type") == "kvm"
    assert root.find("os/type").get("machine") == "q35"
    loader = root.find("os/loader")
    assert (loader.get("type"), loader.get("readonly"), loader.text) == (
        "rom",
        "yes",
        "/usr/share/edk2/ovmf/OVMF.inteltdx.fd",
    )
    assert root.find("os").get("firmware") is None  # never pflash/NVRAM
    assert root.find("os/nvram") is None
    assert root.find("features/ioapic").get("driver") == "qemu"
    assert root.find("features/smm").get("state") == "off"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("memoryBacking/source").get("type") == "anonymous"
    assert root.find("memoryBacking/access").get("mode") == "private"
    assert root.find("devices/graphics") is None
    assert root.find("devices/console/target").get("type") == "serial"
    assert root.findtext("on_reboot") == "destroy"


def test_tdx_quote_generation_service_and_policy() -> None:
    vm = vms_for(Tee.tdx)[0]
    opts = tee.TeeOptions(tdx_policy=0x10000001, tdx_qgs_socket=Path("/var/run/tdx-qgs/qgs.socket"))
    xml = render.render_domain(vm, replace(inputs_for(Tee.tdx, Accel.kvm), options=opts))
    assert launch_security(xml) == canonical(
        "<launchSecurity type='tdx'><policy>0x10000001</policy>"
        "<quoteGenerationService path='/var/run/tdx-qgs/qgs.socket'/></launchSecurity>"
    )


def test_snp_shape() -> None:
    xml = rendered("sev-snp", Role.master)
    assert launch_security(xml) == canonical(
        "<launchSecurity type='sev-snp' authorKey='no' vcek='yes' kernelHashes='yes'>"
        "<cbitpos>51</cbitpos><reducedPhysBits>1</reducedPhysBits>"
        "<policy>0x00030000</policy></launchSecurity>"
    )
    root = tree(xml)
    assert root.find("os").get("firmware") is None  # a known file: no autoselection
    loader = root.find("os/loader")
    assert (loader.get("type"), loader.get("readonly"), loader.get("stateless")) == (
        "rom",
        "yes",
        "yes",
    )
    assert loader.text.endswith("OVMF.amdsev.fd")
    assert root.findtext("os/kernel") and root.findtext("os/cmdline")  # measured direct boot
    assert root.find("os/type").get("machine") == "q35"
    assert root.find("memoryBacking") is None  # libvirt picks memfd; no locking for SNP
    assert root.findtext("on_reboot") == "destroy"  # never restarted outside the attested launch


def test_snp_bits_come_from_the_caps() -> None:
    text = (render.BUILTIN_HOSTS_DIR / "sev-snp-host.domcaps.xml").read_text()
    caps = HostCaps.from_domcaps_xml(
        text.replace("<cbitpos>51<", "<cbitpos>47<").replace(
            "<reducedPhysBits>1<", "<reducedPhysBits>5<"
        )
    )
    inputs = replace(inputs_for(Tee.sev_snp, Accel.kvm), caps=caps)
    node = tree(render.render_domain(vms_for(Tee.sev_snp)[0], inputs)).find("launchSecurity")
    assert (node.findtext("cbitpos"), node.findtext("reducedPhysBits")) == ("47", "5")


def test_snp_without_bits_is_refused() -> None:
    inputs = replace(inputs_for(Tee.sev_snp, Accel.kvm), caps=plain_caps(True))
    with pytest.raises(HostUnsupported, match="cbitpos"):
        render.render_domain(vms_for(Tee.sev_snp)[0], inputs)


def test_no_tee_shapes() -> None:
    tcg, kvm = tree(rendered("none-tcg", Role.worker)), tree(rendered("none-kvm", Role.worker))
    assert tcg.get("type") == "qemu" and kvm.get("type") == "kvm"
    assert tcg.find("cpu").get("mode") == "custom"
    assert tcg.findtext("cpu/model") == "Nehalem"
    # QEMU 7.2's TCG CMPXCHG16B double-faults Linux 6.12: cx16 is off under TCG only
    disabled = [(f.get("policy"), f.get("name")) for f in tcg.findall("cpu/feature")]
    assert disabled == [("disable", "cx16")]
    assert kvm.find("cpu").get("mode") == "host-passthrough"
    assert kvm.find("cpu/feature") is None
    for root in (tcg, kvm):
        assert root.find("launchSecurity") is None
        assert root.find("os/loader") is None


def test_devices() -> None:
    vm = vms_for(Tee.none)[1]
    root = tree(render.render_domain(vm, inputs_for(Tee.none, Accel.tcg)))
    disks = root.findall("devices/disk")
    assert [(d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [
        ("vda", "virtio"),
        ("vdb", "virtio"),
    ]
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[0].find("source").get("file") == str(vm.disk)
    assert disks[0].find("readonly") is not None  # the dm-verity root: never written
    assert disks[1].find("readonly") is not None
    assert disks[1].find("source").get("file") == str(vm.seed)
    nic = root.find("devices/interface")
    assert nic.find("mac").get("address") == vm.mac
    assert nic.find("source").get("network") == "gcvm-demo"
    assert nic.find("model").get("type") == "virtio"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == str(vm.serial_log)
    assert root.find("devices/console/source").get("path") == str(vm.serial_log)
    assert root.findtext("devices/rng/backend") == "/dev/urandom"
    assert (
        root.findtext("os/kernel"),
        root.findtext("os/initrd"),
        root.findtext("os/cmdline"),
    ) == (str(IMAGE / "vmlinuz"), str(IMAGE / "initrd.img"), CMDLINE)
    assert root.findtext("uuid") == vm.uuid
    assert root.findtext("memory") == "2048" and root.findtext("vcpu") == "1"


def test_values_are_escaped() -> None:
    inputs = replace(inputs_for(Tee.none, Accel.tcg), cmdline='quiet a=<b> c="&d"')
    root = tree(render.render_domain(vms_for(Tee.none)[0], inputs))
    assert root.findtext("os/cmdline") == 'quiet a=<b> c="&d"'


# --- metadata --------------------------------------------------------------------------------


def test_metadata_round_trip() -> None:
    vm = vms_for(Tee.tdx, workers=2)[2]
    tag = render.parse_metadata(render.render_domain(vm, inputs_for(Tee.tdx, Accel.kvm)))
    assert tag == ("demo", "worker", 2)
    cluster, role, rank = tag
    assert (cluster, role, rank) == (vm.cluster, vm.role.value, vm.rank)
    assert dict(tag) == {"cluster": "demo", "role": "worker", "rank": 2}
    node = tree(rendered("tdx", Role.master)).find(f"metadata/{{{render.METADATA_NS}}}cluster")
    assert node is not None


def test_metadata_of_foreign_domains() -> None:
    assert render.parse_metadata("<domain type='kvm'><name>x</name></domain>") is None
    assert render.parse_metadata("not xml") is None
    other = (
        "<domain><metadata><a:cluster xmlns:a='https://other.example/1' name='x' "
        "role='worker' rank='1'/></metadata></domain>"
    )
    assert render.parse_metadata(other) is None


# --- templates -------------------------------------------------------------------------------


def test_user_template_overrides_one_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "domain.xml.j2").write_text(
        '{% extends "gcvm/domain.xml.j2" %}'
        "{% block lifecycle %}{{ super() }}  <description>{{ vm.name }} custom</description>\n"
        "{% endblock %}"
    )
    monkeypatch.setenv("GCVM_TEMPLATE_PATH", str(tmp_path))
    root = tree(rendered("none-tcg", Role.master))
    assert root.findtext("description") == "demo-master0 custom"
    assert root.findtext("on_reboot") == "restart"  # the rest is the built-in template


def test_user_partial_replaces_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices/rng.xml.j2").write_text(
        '    <rng model="virtio"><backend model="random">/dev/random</backend></rng>\n'
    )
    monkeypatch.setenv("GCVM_TEMPLATE_PATH", str(tmp_path))
    assert tree(rendered("tdx", Role.worker)).findtext("devices/rng/backend") == "/dev/random"


def test_undefined_values_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices/rng.xml.j2").write_text("<rng>{{ no_such_value }}</rng>\n")
    monkeypatch.setenv("GCVM_TEMPLATE_PATH", str(tmp_path))
    with pytest.raises(render.TemplateError, match="no_such_value"):
        rendered("none-kvm", Role.master)


# --- network ---------------------------------------------------------------------------------


def test_network() -> None:
    spec = ClusterSpec(name="demo", workers=4, subnet=SUBNET)
    vms = plan_vms(spec, CLUSTER_DIR)
    root = tree(render.render_network(spec, vms, bridge="virbr7"))
    assert root.findtext("name") == "gcvm-demo"
    assert root.find("forward").get("mode") == "nat"
    assert root.find("bridge").get("name") == "virbr7"
    ip = root.find("ip")
    assert (ip.get("address"), ip.get("netmask")) == ("192.168.122.1", "255.255.255.0")
    hosts = [(h.get("mac"), h.get("name"), h.get("ip")) for h in ip.findall("dhcp/host")]
    assert hosts == [(vm.mac, vm.name, vm.address) for vm in vms]
    dhcp_range = ip.find("dhcp/range")
    assert (dhcp_range.get("start"), dhcp_range.get("end")) == ("192.168.122.15", "192.168.122.254")


# --- tee.require -----------------------------------------------------------------------------


def test_require_names_each_failed_check_and_suggests_none() -> None:
    with pytest.raises(HostUnsupported) as info:
        tee.require(ClusterSpec(tee=Tee.tdx), plain_caps(False))
    message = info.value.message
    for check in ("KVM usable", "TDX launch security", "TDX firmware (TDVF)"):
        assert check in message
    assert "--tee none" in (info.value.hint or "")
    assert info.value.exit_code == 2


def test_require_resolves_the_accelerator() -> None:
    assert tee.require(ClusterSpec(), plain_caps(False)) is Accel.tcg
    assert tee.require(ClusterSpec(), plain_caps(True)) is Accel.kvm
    assert tee.require(ClusterSpec(tee=Tee.tdx), render.BUILTIN_HOSTS[Tee.tdx].caps()) is Accel.kvm
    with pytest.raises(HostUnsupported, match="KVM usable"):
        tee.require(ClusterSpec(accel=Accel.kvm), plain_caps(False))
    with pytest.raises(HostUnsupported, match="cannot run under TCG"):
        tee.require(
            ClusterSpec(tee=Tee.sev_snp, accel=Accel.tcg), render.BUILTIN_HOSTS[Tee.sev_snp].caps()
        )


def test_mixed_cluster_checks_both_tees() -> None:
    spec = ClusterSpec(tee=Tee.tdx, worker_tee=Tee.none)
    assert tee.require(spec, render.BUILTIN_HOSTS[Tee.tdx].caps()) is Accel.kvm
    with pytest.raises(HostUnsupported) as info:
        tee.require(spec, plain_caps(True))
    assert "[tdx]" in info.value.message and "[none]" not in info.value.message


def test_backend_registry() -> None:
    assert {t: tee.backend(t).tee for t in Tee} == {t: t for t in Tee}
    assert tee.backend(Tee("sev-snp")).template == "launch_security/sev-snp.xml.j2"


def test_shared_daemon_domains_name_an_unprivileged_dac_user() -> None:
    for scenario, (_tee, _accel, run_as) in SCENARIOS.items():
        root = tree(rendered(scenario, Role.worker))
        labels = root.findall("seclabel")
        if run_as is None:
            assert labels == []  # a private daemon's qemu.conf names the user
        else:
            (label,) = labels
            assert (label.get("type"), label.get("model"), label.get("relabel")) == (
                "static",
                "dac",
                "yes",
            )
            assert label.findtext("label") == run_as and not run_as.startswith("root")


def test_a_users_image_boots_from_its_disk() -> None:
    """--image PATH: no kernel to boot directly, so the domain boots the disk (it rendered
    <kernel>None</kernel> before, and libvirt refused to start it)."""
    vm = vms_for(Tee.none)[0]
    inputs = replace(inputs_for(Tee.none, Accel.tcg), kernel=None, initrd=None)
    root = tree(render.render_domain(vm, inputs))
    assert root.find("os/kernel") is None and root.find("os/initrd") is None
    assert root.find("os/boot").get("dev") == "hd"


def test_only_a_verity_root_is_read_only() -> None:
    from orchestrator.cluster.backend import render_inputs
    from orchestrator.image.model import Image, verity_cmdline

    def image(kernel: Path | None, cmdline: str) -> Image:
        return Image(IMAGE, IMAGE / "disk.qcow2", kernel, kernel, cmdline, "python3", "", 0,
                     0.0, "", {})  # fmt: skip

    host = SimpleNamespace(caps=caps_for(Tee.none, Accel.tcg), accel=Accel.tcg, run_as=None)
    verity = f"root=/dev/mapper/gcvm-root ro {verity_cmdline('ab' * 32, 4096 * 10)}"
    vm = vms_for(Tee.none)[0]
    for img, readonly in (
        (image(IMAGE / "vmlinuz", verity), True),
        (image(IMAGE / "vmlinuz", "root=/dev/vda rw"), False),  # an image without verity
        (image(None, ""), False),  # a user's own cloud image writes its disk
    ):
        root = tree(render.render_domain(vm, render_inputs(img, host, "net")))
        assert (root.findall("devices/disk")[0].find("readonly") is not None) is readonly
