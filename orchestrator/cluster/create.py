"""`up`'s creating half: the initial state, keys, network, disks, seeds, domains."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import keys, privatelibvirt, state, ui
from orchestrator.cluster.backend import Backend, HostFacts
from orchestrator.cluster.parallel import _parallel, check
from orchestrator.hypervisor import DhcpHost, Hypervisor
from orchestrator.spec import Accel, ClusterSpec, Tee, VmSpec
from orchestrator.state import ClusterState, VmState

# libvirt may take ~45 s per start while it probes QEMU (see privatelibvirt's /dev/kvm fix).
START_GRACE_S = 120.0


@dataclass
class _Up:
    spec: ClusterSpec
    backend: Backend
    timeout: float
    image_path: Path | None
    st: ClusterState | None = None
    hv: Hypervisor | None = None

    @property
    def dir(self) -> Path:
        return state.cluster_dir(self.spec.name)


def _initial_state(spec: ClusterSpec, vms: list[VmSpec], image: Any) -> ClusterState:
    cdir = state.cluster_dir(spec.name)
    own_network = spec.network is None
    uri = spec.connect or privatelibvirt.uri_for(privatelibvirt.run_dir_for(spec.name))
    spec_dict = {
        k: (str(v) if isinstance(v, Path | Tee | Accel) else v) for k, v in asdict(spec).items()
    }
    return ClusterState(
        name=spec.name,
        spec=spec_dict,
        uri=uri,
        netns=spec.netns if spec.connect is None else None,
        network=spec.network_name,
        own_network=own_network,
        client_key=cdir / "ssh" / "id_ed25519",
        known_hosts=cdir / "ssh" / "known_hosts",
        image={
            "disk": str(image.disk),
            "python": image.python,
            "recipe_hash": image.recipe_hash,
            "kernel_version": image.kernel_version,
        },
        vms=[
            VmState(
                name=vm.name,
                role=vm.role.value,
                rank=vm.rank,
                index=vm.index,
                address=vm.address,
                mac=vm.mac,
                tee=vm.tee,
                vcpus=vm.vcpus,
                memory_mib=vm.memory_mib,
                disk=str(vm.disk),
                seed=str(vm.seed),
                serial_log=str(vm.serial_log),
                locked=vm.locked,
            )
            for vm in vms
        ],
    )


def _write_keys(st: ClusterState, vms: list[VmSpec]) -> dict[str, keys.KeyPair]:
    """The cluster's client key, a host key per VM, and known_hosts pinning them by address."""
    keys.ensure_keypair(st.client_key, comment=f"gcvm-{st.name}")
    host_keys = {vm.name: keys.generate_ed25519(comment=vm.name) for vm in vms}
    keys.write_known_hosts(
        st.known_hosts, {vm.address: host_keys[vm.name].public_openssh for vm in vms}
    )
    return host_keys


def _create(
    run: _Up, vms: list[VmSpec], image: Any, host: HostFacts, host_keys: dict[str, keys.KeyPair]
) -> None:
    spec, backend, hv = run.spec, run.backend, run.hv
    assert hv is not None and run.st is not None
    with ui.step(f"network {run.st.network}"):
        if run.st.own_network:
            hv.define_network(backend.render_network(spec, vms))
        else:
            for vm in vms:
                hv.add_dhcp_host(run.st.network, DhcpHost(vm.mac, vm.name, vm.address))
    with ui.step(f"disks and seeds for {len(vms)} VMs"):
        client_pub = run.st.client_key.with_name(run.st.client_key.name + ".pub").read_text()
        for vm in vms:
            backend.create_overlay(image.disk, image.disk_format, vm.disk)
            backend.build_seed(vm, client_pub.strip(), host_keys[vm.name])
            vm.serial_log.parent.mkdir(parents=True, exist_ok=True)
        code = _code_disk(run, vms)
        shared = [p for p in (image.disk, image.kernel, image.initrd, code and code.path)
                  if p is not None]  # fmt: skip
        mine = [p for vm in vms for p in (vm.disk, vm.seed, vm.serial_log)]
        backend.check_guest_access([*shared, *mine], host, spec)
    with ui.step(f"define and start {', '.join(vm.name for vm in vms)}"):
        network = run.st.network
        pins = str((run.st.trust or {}).get("cmdline", ""))
        cancel = threading.Event()

        def start(vm: VmSpec) -> str:
            check(cancel)  # another start failed: define nothing more
            return hv.start_domain(backend.render_domain(vm, image, host, network, pins, code))

        # a start in flight is waited for: teardown must see every domain it defines
        _parallel(start, vms, "start", cancel=cancel, grace=START_GRACE_S)


def _code_disk(run: _Up, vms: list[VmSpec]) -> Any:
    """The locked masters' framework code (one disk, read-only, shared), or None."""
    if not any(vm.locked for vm in vms):
        return None
    from orchestrator import codedisk, deploy

    disk = codedisk.build(run.dir / "disks" / "code.img", deploy.project_root())
    ui.info(f"locked masters: framework code on {disk.path.name}, dm-verity root hash "
            f"{disk.root_hash[:16]}... (in their kernel command line)")  # fmt: skip
    return disk
