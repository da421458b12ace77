"""`gcvm run exec` and `gcvm run seed`: a command per role on its VMs (and the host worker) with
each rank's seed environment; for `run seed`, the seed's scripts with the model as packages
released by the run's key broker. What differs from the other verbs: the command and the
environment each rank gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator import packages, report
from orchestrator.errors import UsageError
from orchestrator.run import deploy
from orchestrator.run.session import RunSession
from orchestrator.run.settings import BenchSettings
from orchestrator.run.world import guest_env, host_env, plan_world, workers_first
from orchestrator.spec import Role, check_timeout
from orchestrator.ui import out, step

SEED_SHAPE = {"BATCH": "2", "SEQ": "32"}  # the seed scripts' defaults, passed to them explicitly
SEED_ENV = {"FORCE_TCP": "1"}  # `gcvm run seed`: TCP only between machines, as bench's --force-tcp
SEED_COMMANDS = {
    Role.worker: ["tee_test_transformer_worker.py"],
    Role.master: ["tee_test_transformer_master.py"],
}


def run_exec(
    name: str,
    commands: Mapping[Role, Sequence[str]],
    *,
    port: int,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    packages_for: BenchSettings | None = None,
) -> None:
    """Run a command per role on its VMs (and the host worker) with each rank's seed environment
    (RANK, WORLD_SIZE, WORKER, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME,
    GCVM_ROLE): workers first, then masters, as the seed's instructions start them.

    With `packages_for` (`gcvm run seed --model`), the model's packages are protected on the
    host (or taken as given), copied into the VMs and released by the run's broker as in `run
    bench`, and each rank's environment names them: MODEL, BROKER and TEE for masters, PACKAGE
    for workers (what the seed scripts read)."""
    if not any(commands.values()):
        raise UsageError("no command given", hint="gcvm run exec -- CMD ARGS...")
    check_timeout("--timeout", timeout)
    from orchestrator.pods import lifecycle

    if lifecycle.is_pods(name):  # the same, in pods (podman exec instead of SSH)
        from orchestrator.pods import exec as pods_exec

        pods_exec.run_exec(name, commands, port=port, timeout=timeout, extra_env=extra_env,
                           packages_for=packages_for)  # fmt: skip
        return
    with RunSession(name) as run:
        st, hw, tee = run.st, run.hw, run.tee
        if packages_for is not None:
            run.check_policy(packages_for.policy)
        pairs = [(n, r) for n, r in plan_world(st, port) if commands.get(r.role)]
        pkgs: list[packages.HostPackage] = []
        if packages_for is not None:
            pkgs, package_facts = deploy.prepare_packages(st, packages_for)
        remotes = run.connect([n.name for n, _ in pairs if not n.host])
        if packages_for is not None:
            with step(f"copy {len(pkgs)} package(s) into the VMs"):
                deploy.copy_packages(pairs, remotes, pkgs, packages.needs_baselines(
                    packages_for.modes, False))  # fmt: skip
            run.start_broker(pkgs, packages_for.policy, Path(package_facts["owner"]))
        for node, rank in workers_first(pairs):
            seed_env = {**(extra_env or {}), **rank.env(), "GCVM_ROLE": rank.role.value,
                        **deploy.package_env(node, rank.role, pkgs, run.broker, tee)}  # fmt: skip
            env = {**guest_env(st), **seed_env}
            host = host_env(hw, seed_env) if hw is not None else {}
            run.start(node, rank.role, list(commands[rank.role]), env, host)
        run.watch(timeout)
    if run.broker is not None:
        out.print(report.broker_table(deploy.broker_verdicts(st, run.broker)))


def seed_package_settings(model: str, variables: dict[str, str], keys: tuple[str, ...],
                          owner: str | None, policy: str | None) -> BenchSettings:  # fmt: skip
    """What `gcvm run seed --model` protects and deploys: the modes and the reference shape
    come from the scripts' variables (MODES, BATCH, SEQ), which get the shape explicitly, so
    the package's sealed reference is for the batch they run."""
    for key, default in SEED_SHAPE.items():
        variables.setdefault(key, default)

    def number(key: str) -> int:
        try:
            return int(variables[key])
        except ValueError:
            raise UsageError(f"--set {key}={variables[key]!r} is not an integer") from None

    modes = tuple(m for m in variables.get("MODES", "groupcover").split(",") if m)
    return BenchSettings(model=model, modes=modes, batch=number("BATCH"), seq=number("SEQ"),
                         audit=False, keys=keys, owner=owner, policy=policy)  # fmt: skip
