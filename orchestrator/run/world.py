"""The ranks of one run from the cluster state, and what a result says of the cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import hostworker, paths, state
from orchestrator.errors import UsageError
from orchestrator.hostworker import HostWorkerState
from orchestrator.spec import RankSpec, Role, Tee, VmSpec, plan_ranks

GUEST_PYTHON = "/opt/gcvm/venv/bin/python"


@dataclass(frozen=True)
class Node:
    """One rank's machine: a VM (reached over SSH) or the host worker (a local process)."""

    name: str
    role: Role
    host: bool  # the host worker (`gcvm up --worker host`)
    cpus: int  # vCPUs, or the host worker's threads


def _spec(st: state.ClusterState, name: str, role: Role, rank: int, index: int, address: str,
          vcpus: int) -> VmSpec:  # fmt: skip
    """Just enough of a spec to plan a rank (role, rank, index, address)."""
    return VmSpec(cluster=st.name, name=name, role=role, rank=rank, index=index, tee=Tee.none,
                  vcpus=vcpus, memory_mib=0, address=address, prefix=0, gateway="", mac="",
                  uuid="", disk=Path(), seed=Path(), serial_log=Path())  # fmt: skip


def plan_world(
    st: state.ClusterState, port: int, masters: int | None = None
) -> list[tuple[Node, RankSpec]]:
    """Every rank of one run from the cluster state: the first `masters` master VMs (all by
    default) take ranks 0..M-1, then the worker VMs or the host worker. The host worker's
    interface is the bridge (as the seed's GLOO_SOCKET_IFNAME/TP_SOCKET_IFNAME on the host)."""
    all_masters = sorted((vm for vm in st.vms if vm.role == Role.master), key=lambda v: v.index)
    if masters is not None and not 1 <= masters <= len(all_masters):
        raise UsageError(
            f"--masters {masters}: cluster {st.name} has {len(all_masters)} master VM(s)",
            hint=f"choose 1..{len(all_masters)} (default: all of them)",
        )
    chosen = all_masters[: masters or len(all_masters)]
    worker_vms = sorted((vm for vm in st.vms if vm.role == Role.worker), key=lambda v: v.index)
    nodes: list[Node] = []
    specs: list[VmSpec] = []
    ifnames: dict[str, str] = {}
    for vm in chosen:
        nodes.append(Node(vm.name, Role.master, False, vm.vcpus))
        specs.append(_spec(st, vm.name, Role.master, len(specs), vm.index, vm.address, vm.vcpus))
        ifnames[vm.name] = vm.ifname
    for vm in worker_vms:
        nodes.append(Node(vm.name, Role.worker, False, vm.vcpus))
        specs.append(_spec(st, vm.name, Role.worker, len(specs), vm.index, vm.address, vm.vcpus))
        ifnames[vm.name] = vm.ifname
    hw = st.worker_host
    if hw is not None:
        nodes.append(Node(hw.name, Role.worker, True, hw.threads))
        specs.append(_spec(st, hw.name, Role.worker, len(specs), 0, hw.address, hw.threads))
        ifnames[hw.name] = hw.ifname
    ranks = plan_ranks(specs, port, ifnames)
    return list(zip(nodes, ranks, strict=True))


def cluster_facts(st: state.ClusterState) -> dict[str, Any]:
    """What a result must carry to be read later: TEE per VM as requested and as verified."""
    return {
        "cluster": st.name,
        "host": st.host,
        "image": st.image,
        "vms": [
            {
                "name": vm.name,
                "role": vm.role,
                "rank": vm.rank,
                "address": vm.address,
                "tee": str(vm.tee),
                "tee_verified": vm.tee_verified,
                "tee_evidence": vm.tee_evidence,
                "vcpus": vm.vcpus,
                "memory_mib": vm.memory_mib,
            }
            for vm in sorted(st.vms, key=lambda v: v.rank)
        ],
        "host_worker": _host_worker_facts(st),
    }


def _host_worker_facts(st: state.ClusterState) -> dict[str, Any] | None:
    hw = st.worker_host
    if hw is None:
        return None
    return {"name": hw.name, "address": hw.address, "ifname": hw.ifname, "device": hw.device,
            "device_name": hw.device_name, "torch": hw.torch, "threads": hw.threads,
            "pid": hw.pid, "tee": "none (host process)"}  # fmt: skip


def framework_tee(st: state.ClusterState) -> str:
    """The evidence a master gives the broker: the cluster's TEE in the framework's words."""
    tee = str(st.spec.get("tee", "none"))
    return {"sev-snp": "snp"}.get(tee, tee)


def hw_name(st: state.ClusterState) -> str | None:
    hw = st.worker_host
    return hw.name if hw is not None else None


def results_root(name: str) -> Path:
    """Results outlive the cluster (`down` removes its state), so they live beside it."""
    return paths.state_root() / "results" / name


def guest_python(st: state.ClusterState) -> str:
    return str(st.image.get("python", GUEST_PYTHON))


def guest_env(st: state.ClusterState) -> dict[str, str]:
    bindir = guest_python(st).rsplit("/", 1)[0]
    return {
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        # c10d warns on every connection that the guests cannot resolve each other's names
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }


def host_env(hw: HostWorkerState, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host worker's environment: the bridge as the seed's interface variables say."""
    return hostworker.worker_env(
        hw, {"GLOO_SOCKET_IFNAME": hw.ifname, "TP_SOCKET_IFNAME": hw.ifname, **(extra or {})}
    )


def workers_first(pairs: Sequence[tuple[Node, RankSpec]]) -> list[tuple[Node, RankSpec]]:
    """The order ranks start in (as the seed's instructions start them): workers, then masters."""
    return sorted(pairs, key=lambda p: p[1].role is Role.master)
