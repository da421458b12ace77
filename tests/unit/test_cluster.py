"""The cluster flow (`up`, `down`, `status`) against the in-memory hypervisor and fake guests.

Everything else is real: the spec, keys and known_hosts, the seed ISOs, the XML renderer (over a
captured domcapabilities document), the TEE checks, the state file and its lock. The same flow
runs against libvirt and real guests in tests/integration/test_cluster_up_down.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cluster, hostcaps, paths, render, state
from orchestrator.cluster import Backend, HostFacts
from orchestrator.errors import (
    ClusterExists,
    HostUnsupported,
    HypervisorError,
    Interrupted,
    Timeout,
)
from orchestrator.hypervisor import DhcpHost, FakeHypervisor, Hypervisor
from orchestrator.image import Image
from orchestrator.spec import ClusterSpec, Tee
from orchestrator.subnets import Taken

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class FakeResult:
    rc: int
    stdout: str
    stderr: str = ""


@dataclass
class FakeGuest:
    name: str
    mac: str
    ifname: str = "enp1s0"
    dmesg: str = ""
    commands: list[list[str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    closed: bool = False

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        check: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> FakeResult:
        self.commands.append(argv)
        if argv[:2] == ["systemctl", "is-system-running"]:
            return FakeResult(1, "degraded\n")
        if argv[:2] == ["sh", "-c"] and "ip -o link" in argv[2]:
            out = (
                f"{'dmesg: ' + self.dmesg if self.dmesg else ''}\n"
                "link: 1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 link/loopback 00:00:00:00:00:00\n"
                f"link: 2: {self.ifname}: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 "
                f"link/ether {self.mac} brd ff:ff:ff:ff:ff:ff\n"
            )
            return FakeResult(0, out)
        return FakeResult(0, "")

    def put(self, local: Path, remote: str) -> None:
        assert local.exists()
        self.files[remote] = local

    def close(self) -> None:
        self.closed = True


class FakeBackend(Backend):
    """libvirt, namespaces, daemons, disks and SSH in memory; the rest of the flow is real."""

    def __init__(self, tmp: Path) -> None:
        self.hv = FakeHypervisor()
        self.namespaces: set[str] = set()
        self.daemons: set[str] = set()
        self.guests: dict[str, FakeGuest] = {}
        self.unreachable: set[str] = set()
        self.interrupt_on_connect = False
        self.caps = hostcaps.HostCaps.from_domcaps_xml(
            (FIXTURES / "domcaps-plain-debian12.xml").read_text(),
            kvm=hostcaps.KvmProbe(False, "not probed in unit tests"),
        )
        self.image = _image(tmp)
        self.lock = threading.Lock()
        self.host_nets: list[Taken] = []  # the host's routes and addresses, as `ip` would say

    def host_networks(self) -> list[Taken]:
        return list(self.host_nets)

    def check_guest_access(self, files: list[Path], host: HostFacts, spec: ClusterSpec) -> None:
        self.checked_files = list(files)  # pytest's tmp_path is 0700: checked for real elsewhere

    def open_hypervisor(self, uri: str) -> Hypervisor:
        self.hv.closed = False
        return self.hv

    def create_netns(self, name: str) -> None:
        self.namespaces.add(name)

    def delete_netns(self, name: str) -> bool:
        present = name in self.namespaces
        self.namespaces.discard(name)
        return present

    def netns_exists(self, name: str) -> bool:
        return name in self.namespaces

    def netns_pids(self, name: str) -> list[int]:
        return []

    def start_daemon(self, cluster_name: str, netns_name: str, root: Path) -> dict[str, Any]:
        self.daemons.add(cluster_name)
        return {"netns": netns_name, "root": str(root), "libvirtd_pid": 1, "virtlogd_pid": 2}

    def stop_daemon(self, cluster_name: str) -> bool:
        present = cluster_name in self.daemons
        self.daemons.discard(cluster_name)
        return present

    def daemon_leftover(self, cluster_name: str) -> bool:
        return cluster_name in self.daemons

    def daemon_alive(self, daemon: dict[str, Any]) -> bool:
        return Path(daemon["root"]).parent.name in self.daemons

    def precheck(self, spec: ClusterSpec) -> HostFacts:
        return cluster._host(spec, self.caps, {})

    def host_facts(self, hv: Hypervisor, spec: ClusterSpec) -> HostFacts:
        return cluster._host(spec, self.caps, hv.versions())

    def find_image(self, image_path: Path | None) -> Image:
        return self.image

    def create_overlay(self, base: Path, base_format: str, overlay: Path) -> None:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        overlay.write_text(f"overlay over {base} ({base_format})")

    def connect(self, st: state.ClusterState, vm: state.VmState, timeout: float) -> FakeGuest:
        if self.interrupt_on_connect:
            raise KeyboardInterrupt
        if vm.name in self.unreachable:
            raise Timeout(f"{vm.name} ({vm.address}:22) not reachable over SSH")
        assert self.hv.lease_address(vm.name, vm.mac) == vm.address
        guest = FakeGuest(vm.name, vm.mac)
        with self.lock:
            self.guests[vm.name] = guest
        return guest

    def build_wheel(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        wheel = out_dir / "gcvm-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"PK")
        return wheel


def _image(tmp: Path) -> Image:
    root = tmp / "image"
    root.mkdir()
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (root / name).write_text(name)
    return Image(
        root=root,
        disk=root / "disk.qcow2",
        kernel=root / "vmlinuz",
        initrd=root / "initrd.img",
        cmdline="root=/dev/vda rw console=ttyS0",
        python="/opt/gcvm/venv/bin/python",
        recipe_hash="abc123",
        size_bytes=1,
        built_seconds=1.0,
        kernel_version="6.1.0",
        tee_guest_support={},
    )


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    yield FakeBackend(tmp_path)


def _nothing_left(backend: FakeBackend, name: str, *, network_kept: bool = False) -> None:
    """`network_kept`: the fake daemon's network outlives it (a real one dies with it)."""
    assert backend.hv.domains() == []
    assert network_kept or backend.hv.networks == {}
    assert backend.namespaces == set()
    assert backend.daemons == set()
    assert not state.cluster_dir(name).exists()


def test_up_then_down(backend: FakeBackend) -> None:
    spec = ClusterSpec(name="t1", workers=2)
    st = cluster.up(spec, backend=backend)

    assert st.phase == "ready" and st.netns == "gcvm-t1"
    assert [vm.name for vm in st.vms] == ["t1-master0", "t1-worker0", "t1-worker1"]
    assert [vm.rank for vm in st.vms] == [0, 1, 2]
    assert all(vm.ifname == "enp1s0" and vm.tee_verified == "none" for vm in st.vms)
    assert st.host["accel"] == "tcg"
    assert st.image["python"] == "/opt/gcvm/venv/bin/python"
    assert state.load("t1") == st

    # network with one static DHCP entry per VM; domains tagged with gcvm metadata
    hosts = backend.hv.dhcp_hosts("gcvm-t1")
    assert {(h.mac, h.ip) for h in hosts} == {(vm.mac, vm.address) for vm in st.vms}
    tags = {d.name: d.metadata for d in backend.hv.cluster_domains("t1")}
    assert tags["t1-worker1"]["role"] == "worker" and tags["t1-worker1"]["rank"] == 2
    assert all(d.state == "running" for d in backend.hv.domains())

    # keys: known_hosts pins one key per VM address; seeds and overlays exist
    known = st.known_hosts.read_text().splitlines()
    assert sorted(line.split()[0] for line in known) == [vm.address for vm in st.vms]
    assert all(line.split()[1] == "ssh-ed25519" for line in known)
    assert st.client_key.stat().st_mode & 0o777 == 0o600
    for vm in st.vms:
        assert Path(vm.disk).exists() and Path(vm.seed).exists()

    # readiness and code: every guest checked systemd, then installed the wheel
    for guest in backend.guests.values():
        assert ["systemctl", "is-system-running", "--wait"] in guest.commands
        pip = [c for c in guest.commands if c[1:4] == ["-m", "pip", "install"]]
        assert pip and pip[0][0] == "/opt/gcvm/venv/bin/python" and "--no-index" in pip[0]
        assert list(guest.files) == ["/var/tmp/gcvm-wheels/gcvm-0.1.0-py3-none-any.whl"]
        assert guest.closed

    report = cluster.status("t1", backend=backend)
    assert [row.state for row in report.vms] == ["running"] * 3

    assert cluster.down("t1", backend=backend) is True
    _nothing_left(backend, "t1")
    assert cluster.down("t1", backend=backend) is False


def test_existing_name_is_refused(backend: FakeBackend) -> None:
    cluster.up(ClusterSpec(name="t2"), backend=backend)
    before = {d.name for d in backend.hv.domains()}
    with pytest.raises(ClusterExists) as err:
        cluster.up(ClusterSpec(name="t2"), backend=backend)
    assert err.value.hint == "gcvm down --name t2"
    assert {d.name for d in backend.hv.domains()} == before
    cluster.down("t2", backend=backend)


def test_unsupported_tee_is_refused_before_anything_exists(backend: FakeBackend) -> None:
    with pytest.raises(HostUnsupported):
        cluster.up(ClusterSpec(name="t3", tee=Tee.tdx), backend=backend)
    _nothing_left(backend, "t3")


def test_unreachable_vm_fails_naming_it_and_cleans_up(backend: FakeBackend) -> None:
    backend.unreachable.add("t4-worker0")
    serial = state.cluster_dir("t4") / "logs" / "t4-worker0.serial.log"

    orig = backend.create_overlay

    def overlay_and_log(base: Path, fmt: str, overlay: Path) -> None:
        orig(base, fmt, overlay)
        serial.parent.mkdir(parents=True, exist_ok=True)
        serial.write_text("[    1.0] Linux version 6.1\n[   30.0] Kernel panic - not syncing\n")

    backend.create_overlay = overlay_and_log  # type: ignore[method-assign]
    with pytest.raises(Timeout) as err:
        cluster.up(ClusterSpec(name="t4"), backend=backend, timeout=5)
    assert "t4-worker0" in str(err.value)
    assert err.value.hint is not None and "Kernel panic" in err.value.hint
    _nothing_left(backend, "t4")
    kept = list((paths.state_root() / "failed").glob("t4-*"))
    assert len(kept) == 1 and (kept[0] / "logs" / "t4-worker0.serial.log").exists()
    assert (kept[0] / "debug.log").exists()


def test_keep_on_failure_keeps_everything(backend: FakeBackend) -> None:
    backend.unreachable.add("t5-master0")
    with pytest.raises(Timeout):
        cluster.up(ClusterSpec(name="t5"), backend=backend, keep_on_failure=True, timeout=5)
    assert len(backend.hv.cluster_domains("t5")) == 2
    assert state.load("t5").phase == "creating"
    cluster.down("t5", backend=backend)
    _nothing_left(backend, "t5")


def test_interrupt_cleans_up(backend: FakeBackend) -> None:
    backend.interrupt_on_connect = True
    with pytest.raises(Interrupted):
        cluster.up(ClusterSpec(name="t6"), backend=backend)
    _nothing_left(backend, "t6")


def test_down_finds_leftovers_without_state_file(backend: FakeBackend) -> None:
    cluster.up(ClusterSpec(name="t7"), backend=backend)
    state.remove("t7")  # as if `up` crashed before writing it
    assert cluster.down("t7", backend=backend) is True
    _nothing_left(backend, "t7")


def test_down_of_a_private_cluster_goes_on_when_libvirt_cannot_remove_the_network(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private daemon's network dies with the daemon and the namespace, so an error from
    libvirt there (seen: its config file already gone) must not leave them running."""
    cluster.up(ClusterSpec(name="t7b"), backend=backend)

    def refuse(name: str) -> bool:
        raise HypervisorError(
            f"libvirt failed to undefine network {name}: cannot remove config "
            f"file '/etc/libvirt/qemu/networks/{name}.xml': No such file"
        )

    monkeypatch.setattr(backend.hv, "remove_network", refuse)
    assert cluster.down("t7b", backend=backend) is True
    _nothing_left(backend, "t7b", network_kept=True)


def test_tee_mismatch_in_guest_fails(backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    orig = backend.connect

    def confidential(st: state.ClusterState, vm: state.VmState, timeout: float) -> FakeGuest:
        guest = orig(st, vm, timeout)
        guest.dmesg = "Memory Encryption Features active: Intel TDX"
        return guest

    monkeypatch.setattr(backend, "connect", confidential)
    with pytest.raises(cluster.GcvmError, match="guest reports tdx"):
        cluster.up(ClusterSpec(name="t8"), backend=backend)
    _nothing_left(backend, "t8")


def test_existing_network_gets_and_loses_dhcp_entries(backend: FakeBackend) -> None:
    spec = ClusterSpec(name="t9", connect="qemu:///system", network="shared")
    backend.hv.define_network(
        render.render_network(ClusterSpec(name="shared"), [], bridge="virbr9").replace(
            "gcvm-shared", "shared"
        )
    )
    st = cluster.up(spec, backend=backend)
    assert st.netns is None and not st.own_network and st.private_daemon is None
    assert backend.namespaces == set() and backend.daemons == set()
    assert {h.ip for h in backend.hv.dhcp_hosts("shared")} == {vm.address for vm in st.vms}
    cluster.down("t9", backend=backend)
    assert backend.hv.dhcp_hosts("shared") == []
    assert "shared" in backend.hv.networks
    assert backend.hv.domains() == []


def test_bridge_names() -> None:
    assert cluster.bridge_name(ClusterSpec(name="a")) == "virbr0"  # alone in its namespace
    shared = cluster.bridge_name(ClusterSpec(name="a" * 20, connect="qemu:///system"))
    assert shared.startswith("gcvm") and len(shared) <= 15 and shared != "virbr0"
    assert shared != cluster.bridge_name(ClusterSpec(name="b", connect="qemu:///system"))


def test_parse_guest_facts() -> None:
    out = (
        "dmesg: [0.0] Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP\n"
        "device: /dev/sev-guest\n"
        "link: 2: ens3: <BROADCAST> mtu 1500 link/ether 52:54:00:a8:7a:0b brd ff\n"
    )
    ifname, tee, evidence = cluster.parse_guest_facts(out, "52:54:00:A8:7A:0B")
    assert (ifname, tee) == ("ens3", "sev-snp")
    assert "SEV-SNP" in evidence and "/dev/sev-guest" in evidence
    assert cluster.parse_guest_facts(
        "link: 2: eth0@if3: x link/ether 52:54:00:00:00:01", "52:54:00:00:00:01"
    )[:2] == ("eth0", "none")


def test_fake_hypervisor_dhcp_update_semantics() -> None:
    hv = FakeHypervisor()
    hv.define_network("<network><name>n</name><ip><dhcp/></ip></network>")
    host = DhcpHost("52:54:00:00:00:0a", "a", "192.168.122.10")
    hv.add_dhcp_host("n", host)
    with pytest.raises(cluster.HypervisorError):
        hv.add_dhcp_host("n", host)
    hv.remove_dhcp_host("n", host)
    assert hv.dhcp_hosts("n") == []
