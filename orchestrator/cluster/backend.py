"""The real side effects of the cluster flow, one narrow method per step (tests swap in fakes)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from orchestrator import deploy, keys, netns, privatelibvirt, state, subnets, ui
from orchestrator.errors import (
    GcvmError,
    HypervisorError,
)
from orchestrator.hostworker import HostWorkerState
from orchestrator.hypervisor import Hypervisor, LibvirtHypervisor
from orchestrator.privilege import GuestUser, guest_user, require_reachable
from orchestrator.spec import Accel, ClusterSpec, VmSpec
from orchestrator.state import ClusterState, VmState


class Guest(Protocol):
    """What `up` needs of a connection to a guest (orchestrator.remote.Remote)."""

    name: str

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        check: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> Any: ...

    def put(self, local: Path, remote: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class HostFacts:
    accel: Accel
    caps: Any  # hostcaps.HostCaps (opaque here; handed to the renderer)
    facts: dict[str, Any]  # what the state records: versions, accel, TEE support
    guest_user: GuestUser | None = None  # whom QEMU runs as (None: root, no such user here)
    run_as: str | None = None  # a per-domain DAC label (shared daemons only)


class Backend:
    """The real side effects. Each method is one narrow step of the flow."""

    def open_hypervisor(self, uri: str) -> Hypervisor:
        return LibvirtHypervisor(uri)

    # namespaces and the private daemon
    def create_netns(self, name: str) -> None:
        netns.create(name)

    def delete_netns(self, name: str) -> bool:
        return netns.delete(name)

    def netns_exists(self, name: str) -> bool:
        return netns.exists(name)

    def netns_pids(self, name: str) -> list[int]:
        return netns.pids(name)

    def start_daemon(self, cluster: str, netns_name: str, root: Path) -> dict[str, Any]:
        return privatelibvirt.start(cluster, netns_name, root).to_dict()

    def stop_daemon(self, cluster: str) -> bool:
        return privatelibvirt.stop(cluster)

    def daemon_leftover(self, cluster: str) -> bool:
        return privatelibvirt.run_dir_for(cluster).exists()

    def daemon_alive(self, daemon: dict[str, Any]) -> bool:
        return privatelibvirt.PrivateDaemon.from_dict(daemon).alive()

    # host, image, disks
    def precheck(self, spec: ClusterSpec) -> HostFacts:
        """The host's answer before any daemon runs: QEMU asked directly (no side effect)."""
        from orchestrator import hostcaps

        return _host(spec, hostcaps.probe_qemu(kvm_probe=True), {})

    def host_facts(self, hv: Hypervisor, spec: ClusterSpec) -> HostFacts:
        """The host as the cluster's libvirt sees it (domcapabilities: what the renderer needs)."""
        from orchestrator import hostcaps

        if not isinstance(hv, LibvirtHypervisor):
            raise TypeError("the real backend needs a libvirt connection")
        return _host(spec, hostcaps.probe(hv.conn, kvm_probe=True), hv.versions())

    def host_networks(self) -> list[subnets.Taken]:
        """Routes and interface addresses of the host gcvm runs on."""
        return subnets.host_networks()

    def other_clusters(self, name: str) -> list[tuple[str, str, str]]:
        """(name, libvirt URI, subnet) of every other cluster with a state file here."""
        found = []
        for other in state.names():
            if other == name:
                continue
            try:
                st = state.load(other)
            except GcvmError:
                continue
            found.append((st.name, st.uri, str(st.spec.get("subnet") or "")))
        return found

    def find_image(self, image_path: Path | None) -> Any:
        from orchestrator import image

        return image.user_image(image_path) if image_path else image.find_image()

    def create_overlay(self, base: Path, base_format: str, overlay: Path) -> None:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format,
            "-b",
            str(base),
            str(overlay),
        ]
        ui.log.debug("run: %s", " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise HypervisorError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")

    def build_seed(self, vm: VmSpec, authorized_key: str, host_key: keys.KeyPair) -> None:
        from orchestrator import seed

        cfg = seed.SeedConfig(
            hostname=vm.name,
            authorized_keys=[authorized_key],
            host_key_private_pem=host_key.private_openssh,
            host_key_public=host_key.public_openssh,
            address=vm.address,
            prefix=vm.prefix,
            gateway=vm.gateway,
            mac=vm.mac,
            dns=[vm.gateway],
        )
        seed.build_seed_iso(cfg, vm.seed)

    def render_network(self, spec: ClusterSpec, vms: Sequence[VmSpec]) -> str:
        from orchestrator import render

        return render.render_network(spec, list(vms), bridge=bridge_name(spec))

    def render_domain(self, vm: VmSpec, image: Any, host: HostFacts, network: str,
                      pins: str = "", code: Any = None) -> str:  # fmt: skip
        """`code`: the locked masters' code disk (orchestrator.codedisk.CodeDisk), for a
        locked `vm`: its root hash joins the measured command line, the disk the domain."""

        from orchestrator import render

        if vm.locked and code is None:
            raise ValueError(f"{vm.name} is locked but there is no code disk")
        inputs = render_inputs(image, host, network, pins)
        return render.render_domain(vm, render.locked_inputs(vm, inputs, code))

    def check_guest_access(self, files: list[Path], host: HostFacts, spec: ClusterSpec) -> None:
        """Every file QEMU opens must be reachable by the user it runs as (libvirt's DAC driver
        chowns the files themselves, not the folders above them). Remote daemons: unchecked."""
        if host.guest_user is None:
            ui.warn("this host has no libvirt-qemu (or qemu) user: QEMU runs as root")
            return
        if spec.connect is not None and not _is_local(spec.connect):
            return
        require_reachable(files, host.guest_user)

    # guests
    def connect(self, st: ClusterState, vm: VmState, timeout: float) -> Guest:
        from orchestrator.remote import Remote

        return Remote.connect(st, vm, timeout)

    def build_wheel(self, out_dir: Path) -> Path:
        return deploy.build_wheel(out_dir)

    # the host worker (`--worker host`): a process of this host, not a VM
    def start_host_worker(self, hw: HostWorkerState) -> HostWorkerState:
        from orchestrator import hostworker

        try:
            return hostworker.start(hw)
        except hostworker.HostWorkerError as exc:
            raise GcvmError(exc.message, hint=exc.hint) from None

    def host_worker_alive(self, hw: HostWorkerState) -> bool:
        from orchestrator import hostworker

        return hostworker.alive(hw)

    def stop_host_worker(self, hw: HostWorkerState | None, control_dir: Path) -> bool:
        from orchestrator import hostworker

        return hostworker.stop(hw, control_dir)


def _is_local(uri: str) -> bool:
    host = urlsplit(uri).hostname
    return not host or host in ("localhost", "127.0.0.1", "::1")


def bridge_name(spec: ClusterSpec) -> str:
    """virbr0 inside the cluster's own namespace; on a shared daemon (`--connect`), a name of
    the cluster's own that fits Linux's 15 characters and never meets the `default` network's."""
    if spec.connect is None:
        return "virbr0"
    return "gcvm" + hashlib.sha256(spec.name.encode()).hexdigest()[:8]


def render_inputs(image: Any, host: HostFacts, network: str, pins: str = "") -> Any:
    """The renderer's inputs for this image on this host and network; `pins`: kernel command
    line parameters appended to the image's (the owner's identities, `orchestrator.ownerid`)."""
    from orchestrator import render
    from orchestrator.image.model import guest_cmdline, verity_root

    return render.RenderInputs(
        caps=host.caps,
        accel=host.accel,
        kernel=image.kernel,
        initrd=image.initrd,
        # the same composition `gcvm attest policy` measures (SEV-SNP hashes it byte for byte)
        cmdline=guest_cmdline(image.cmdline or render.DEFAULT_CMDLINE, pins),
        network=network,
        run_as=host.run_as,
        root_readonly=verity_root(image),
    )


def _host(spec: ClusterSpec, caps: Any, versions: dict[str, str]) -> HostFacts:
    from orchestrator import hostcaps, tee

    accel = tee.require(spec, caps)
    facts: dict[str, Any] = {
        "accel": str(accel),
        "qemu": hostcaps.fmt_version(caps.qemu_version),
        "libvirt": hostcaps.fmt_version(caps.libvirt_version),
        "emulator": caps.emulator,
        "kvm_usable": caps.kvm_usable,
        "kvm_reason": caps.kvm_reason,
        "tdx": caps.tdx.supported,
        "sev_snp": caps.snp.supported,
        "source": caps.source,
        **{f"libvirt_{k}": v for k, v in versions.items()},
    }
    user = guest_user()
    facts["qemu_user"] = user.label if user else "root"
    # a private daemon's qemu.conf names the user; a shared daemon's is not gcvm's
    run_as = user.label if user is not None and spec.connect is not None else None
    return HostFacts(accel=accel, caps=caps, facts=facts, guest_user=user, run_as=run_as)
