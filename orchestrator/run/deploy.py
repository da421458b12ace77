"""A run's model packages: protected on the host (or taken as given), copied into the VMs, and
what each rank is told of them and of the key broker that releases their keys."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator import packages, report, runbroker, state
from orchestrator.agentclient import LockedGuest
from orchestrator.remote import Remote
from orchestrator.run.settings import BenchSettings
from orchestrator.run.world import Node
from orchestrator.spec import RankSpec, Role
from orchestrator.ui import console, step

Broker = runbroker.RunBroker | runbroker.ClusterBrokerUse


def prepare_packages(st: state.ClusterState, settings: BenchSettings
                     ) -> tuple[list[packages.HostPackage], dict[str, Any]]:  # fmt: skip
    """The run's packages on the host: a built-in name protected here (one per scheme the modes
    need, into the cluster's state folder, keys into the owner folder), or the folders given."""
    owner = run_owner(st, settings.owner)
    if settings.builtin:
        plan = packages.plan_protect(settings.model, settings.modes, settings.audit,
                                     settings.batch, settings.seq)  # fmt: skip
        console.print(f"owner folder (model keys, broker log; nothing else writes here): {owner}")
        with step(
            f"protect {settings.model} on the host ({', '.join(plan.schemes)}"
            f"{', baselines' if any(plan.baselines) else ''}, reference {plan.reference})"
        ):
            pkgs = packages.protect_builtin(plan, state.cluster_dir(st.name), owner,
                                            settings.seed)  # fmt: skip
    else:
        pkgs = packages.given_packages(settings.package_dirs, [Path(k) for k in settings.keys])
    chosen = packages.assign_modes(pkgs, settings.modes)
    used = [p for p in pkgs if p in chosen.values()]  # packages no mode needs are not deployed
    if not settings.builtin and settings.audit and not all(p.has_baselines for p in used):
        console.print(
            "[yellow]note:[/] a package without --baselines: the framework skips the "
            "payload audit for its modes (it holds no plaintext to compare with)"
        )
    facts = {"owner": str(owner), "builtin": settings.builtin,
             "packages": [p.facts() for p in used],
             "modes": {m: p.package_id for m, p in chosen.items()}}  # fmt: skip
    return used, facts


def run_owner(st: state.ClusterState, given: str | None) -> Path:
    """The owner folder of a run: the cluster's (whose identities its guests pin), or one given
    that holds the same identities (any other's packages and broker its masters refuse)."""
    pinned = (st.trust or {}).get("owner")
    owner = packages.owner_dir(st.name, Path(given) if given else None)
    if given is None and pinned:
        return Path(pinned)
    if pinned and owner.resolve() != Path(pinned).resolve():
        from orchestrator import ownerid

        ident = ownerid.ensure(owner) if owner.is_dir() else None
        if ident is None or ident.cmdline != st.trust.get("cmdline"):  # type: ignore[union-attr]
            raise packages.PackageError(
                f"--owner {owner}: the cluster's guests pin the identities of {pinned} "
                "(broker certificate, package signer); packages signed and keys served from "
                "another owner folder are refused by its masters",
                hint=f"leave out --owner (or give {pinned})",
            )
    return owner


def copy_packages(ranks: Sequence[tuple[Node, RankSpec]], remotes: Mapping[str, Remote],
                  pkgs: Sequence[packages.HostPackage],
                  baselines: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Every VM rank gets its files of every package (in parallel, one thread per VM)."""

    def one(node: Node) -> list[dict[str, Any]]:
        target = remotes[node.name]
        if isinstance(target, LockedGuest):
            return [copy_to_locked(target, pkg, packages.copy_plan(pkg, node.role.value, baselines))
                    for pkg in pkgs]  # fmt: skip
        return [packages.copy_to(target, pkg,
                                 packages.copy_plan(pkg, node.role.value, baselines))
                for pkg in pkgs]  # fmt: skip

    vms = [node for node, _ in ranks if not node.host]
    with ThreadPoolExecutor(max_workers=max(1, len(vms))) as pool:
        futures = [pool.submit(one, node) for node in vms]
        return [item for future in futures for item in future.result()]


def copy_to_locked(guest: LockedGuest, pkg: packages.HostPackage,
                   files: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """A package's files into a locked master, through its agent (every file each time: the
    agent's package folder is in the guest's memory and gone with each boot)."""
    start = time.monotonic()
    nbytes = 0
    for name in files:
        nbytes += int(guest.put_package_file(pkg.package_id, pkg.folder / name)["bytes"])
    return {"vm": guest.name, "package_id": pkg.package_id, "copied": list(files), "skipped": [],
            "bytes": nbytes, "seconds": round(time.monotonic() - start, 2)}  # fmt: skip


def model_args(node: Node, role: Role, pkgs: Sequence[packages.HostPackage],
               broker: Broker | None, tee: str) -> list[str]:  # fmt: skip
    """A rank's package flags for the framework (`run bench`)."""
    if role is Role.master:
        args = [a for p in pkgs for a in ("--model", packages.guest_folder(p))]
        if broker is not None:
            args += ["--broker", broker.url, "--tee", tee]
        return args
    if node.host:  # the host worker reads the host's own copy
        return [a for p in pkgs for a in ("--package", str(p.folder))]
    return [a for p in pkgs for a in ("--package", packages.guest_folder(p))]


def package_env(node: Node, role: Role, pkgs: Sequence[packages.HostPackage],
                broker: Broker | None, tee: str) -> dict[str, str]:  # fmt: skip
    """The seed scripts' package variables for one rank (none without packages)."""
    if not pkgs:
        return {}
    if role is Role.master:
        env = {"MODEL": ",".join(packages.guest_folder(p) for p in pkgs), "TEE": tee}
        if broker is not None:
            env["BROKER"] = broker.url
        return env
    folders = [str(p.folder) if node.host else packages.guest_folder(p) for p in pkgs]
    return {"PACKAGE": ",".join(folders)}


def broker_step(st: state.ClusterState) -> str:
    """The step that gives a run's keys to a broker: its own, or the cluster's (`up --broker`)."""
    if st.cluster_broker is None:
        return (
            "start the key broker (a demo broker on this TEE host: in production the "
            "owner's machine runs it)"
        )
    return "give the cluster's key broker the run's keys"


def broker_verdicts(st: state.ClusterState, broker: Broker | None) -> dict[str, dict[str, Any]]:
    """The broker's decisions of a run, per master VM (by the address its requests came from)."""
    return report.broker_verdicts(broker.decisions if broker else [],
                                  {str(vm.address): vm.name for vm in st.vms})  # fmt: skip
