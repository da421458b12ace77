"""`gcvm run exec` and `gcvm run seed` on a pods cluster: a command per role in its pods with
each rank's seed environment (RANK, WORLD_SIZE, WORKER, MASTER_ADDR, MASTER_PORT,
GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME, GCVM_ROLE), workers first; for `run seed`, the model as
packages released by the key broker as in `run bench`, named by MODEL, BROKER, TEE (masters) and
PACKAGE (workers), with the masters' pins as BROKER_CERT and OWNER_KEY. Each pod's output is
printed when the run ends (and kept in the cluster's folder)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import packages, report, state
from orchestrator.pods.bench import ranks
from orchestrator.pods.session import TEE, PodsRun, node
from orchestrator.run import deploy
from orchestrator.run.ranks import printer
from orchestrator.run.settings import BenchSettings
from orchestrator.spec import Role
from orchestrator.ui import out


def run_exec(name: str, commands: Mapping[Role, Sequence[str]], *, port: int, timeout: float,
             extra_env: Mapping[str, str] | None = None,
             packages_for: BenchSettings | None = None) -> None:  # fmt: skip
    logs = state.cluster_dir(name) / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs.mkdir(parents=True, exist_ok=True)
    with PodsRun(name, logs) as run:
        pairs = [(pod, rank) for pod, rank in ranks(run.record, port, None)
                 if commands.get(rank.role)]  # fmt: skip
        pkgs: list[packages.HostPackage] = []
        if packages_for is not None:
            baselines = packages.needs_baselines(packages_for.modes, False)
            pkgs, facts = run.deploy_packages(packages_for, [p for p, _ in pairs], baselines)
            run.start_broker(pkgs, packages_for.policy, Path(facts["owner"]))
        try:
            for pod, rank in sorted(pairs, key=lambda p: p[1].role is not Role.worker):
                env: dict[str, Any] = {**(extra_env or {}), **rank.env(),
                                       "GCVM_ROLE": rank.role.value}  # fmt: skip
                if pkgs:
                    env |= deploy.package_env(node(pod), rank.role, pkgs, run.broker, TEE)
                    env |= run.pin_env(pod)
                run.start(pod, list(commands[rank.role]), env)
            run.watch(timeout)
        finally:
            _print_logs(logs, [p["name"] for p, _ in pairs])
    if run.broker is not None:
        out.print(report.broker_table(run.verdicts()))


def _print_logs(logs: Path, names: Sequence[str]) -> None:
    for pod in names:
        try:
            text = (logs / f"{pod}.log").read_text(errors="replace")
        except OSError:
            continue
        emit = printer(pod)
        for line in text.splitlines():
            emit(line)
