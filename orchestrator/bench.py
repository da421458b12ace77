"""`gcvm run`: the framework's ranks across the cluster's VMs.

The orchestrator computes each rank's settings from the cluster state (rendezvous address, the
guest's own interface name, the worker each master offloads to) and starts the framework's single
entry point, `python -m groupcover launch ...`, over SSH: workers first, then masters. It never
imports the framework; it reads back the JSON each master writes.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import hostworker, packages, paths, report, state, top
from orchestrator.errors import GcvmError, Timeout, UsageError
from orchestrator.hostworker import HostWorkerState
from orchestrator.remote import Remote, RemoteProcess
from orchestrator.spec import (
    MAX_TIMEOUT_S,
    RankSpec,
    Role,
    Tee,
    VmSpec,
    check_timeout,
    plan_ranks,
)
from orchestrator.ui import console, out, step

DEFAULT_PORT = 29500
RESULT_MARK = "GROUPCOVER_RESULT_JSON"
# the framework's modes (groupcover.modes.MODES; a test keeps the two lists equal)
MODES = (
    "tee-only",
    "plain-offload",
    "mask-only",
    "groupcover",
    "groupcover-nomask",
    "hardened",
    "hardened-nomask",
)
MODELS = ("minilm", "minilm-standin", "bert-base", "seed-transformer", "resnet18")


class RankFailed(GcvmError):
    pass


@dataclass(frozen=True)
class BenchSettings:
    model: str = "minilm"
    modes: tuple[str, ...] = ("plain-offload", "groupcover")
    batch: int = 8
    seq: int = 128
    repeat: int = 5
    warmup: int = 1
    seed: int | None = None  # None: every secret from the guest's CSPRNG
    audit: bool = True
    verify: bool = False
    port: int = DEFAULT_PORT
    masters: int | None = None  # the first M master VMs (None: all of them)
    timeout: float = 3600.0  # the whole run, enforced here
    rpc_timeout: float = 600.0  # each rank's rendezvous and per-call deadline (TCG is slow)
    # model packages (issue 11): `model` is a built-in name (protected on the host) or DIR[,DIR..]
    keys: tuple[str, ...] = ()  # the given packages' key files (default DIR/model.key)
    owner: str | None = None  # the owner folder (keys of built-in names; default owner_dir)
    policy: str | None = None  # the broker's policy file (needed with snp/tdx)

    @property
    def builtin(self) -> bool:
        return self.model in MODELS

    @property
    def package_dirs(self) -> tuple[Path, ...]:
        return () if self.builtin else tuple(Path(p) for p in self.model.split(",") if p)

    def __post_init__(self) -> None:
        if not self.builtin and not all(
            (d / packages.MANIFEST).is_file() for d in self.package_dirs or (Path(self.model),)
        ):
            missing = next(
                (d for d in self.package_dirs if not (d / packages.MANIFEST).is_file()),
                Path(self.model),
            )
            raise UsageError(
                f"unknown model {str(missing)!r}: neither a built-in model nor a package folder",
                hint=f"choose one of {', '.join(MODELS)}, or a folder from `gcvm model protect`",
            )
        if self.keys and self.builtin:
            raise UsageError(f"--key is for package folders; {self.model} is a built-in model",
                             hint="its keys are made here, in the owner folder")  # fmt: skip
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UsageError(
                f"unknown mode(s) {', '.join(bad) or '(none given)'}",
                hint=f"choose from {', '.join(MODES)}",
            )
        for flag, value, lo, hi in (
            ("--batch", self.batch, 1, 1024),
            ("--seq", self.seq, 1, 512),
            ("--repeat", self.repeat, 1, 10_000),
            ("--timeout", self.timeout, 1, MAX_TIMEOUT_S),
            ("--rpc-timeout", self.rpc_timeout, 10, 86_400),
            ("--port", self.port, 1024, 65535),
        ):
            if not lo <= value <= hi:
                raise UsageError(f"{flag} {value} is out of range ({lo}..{hi})")
        if self.masters is not None and self.masters < 1:
            raise UsageError(f"--masters {self.masters} is out of range (at least 1)",
                             hint="leave it out to run on every master VM")  # fmt: skip

    def launch_args(self, json_path: str | None, threads: int,
                    model_args: Sequence[str] = ()) -> tuple[str, ...]:  # fmt: skip
        """A rank's workload flags; `model_args` its package flags (--model DIR ... --broker URL
        --tee T for a master, --package DIR ... for a worker)."""
        args = [
            *model_args,
            "--modes",
            ",".join(self.modes),
            "--batch",
            str(self.batch),
            "--seq",
            str(self.seq),
            "--repeat",
            str(self.repeat),
            "--warmup",
            str(self.warmup),
            "--threads",
            str(threads),
            "--timeout",
            str(int(self.rpc_timeout)),
            # VM to VM: TCP only. TensorPipe's shared-memory transport is useless across
            # machines and its reactor thread spins, taking a third of a guest's vCPU.
            "--force-tcp",
        ]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        if self.audit:
            args.append("--audit")
        if self.verify:
            args.append("--verify")
        if json_path:
            args += ["--json", json_path]
        return tuple(args)


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


class _Ranks:
    """The running ranks: started in order, watched together, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, RemoteProcess | hostworker.Job] = {}
        self.roles: dict[str, Role] = {}

    def start(
        self, remote: Remote, vm: str, role: Role, argv: Sequence[str], env: dict[str, str] | None
    ) -> None:
        self.add(vm, role, remote.start(list(argv), env=env, on_line=_printer(vm)))

    def start_on_host(self, hw: HostWorkerState, role: Role, argv: Sequence[str],
                      env: dict[str, str]) -> None:  # fmt: skip
        try:
            job = hostworker.Job(hw, list(argv), env, on_line=_printer(hw.name))
        except hostworker.HostWorkerError as exc:
            raise GcvmError(exc.message, hint=exc.hint) from None
        self.add(hw.name, role, job)

    def add(self, name: str, role: Role, proc: Any) -> None:
        self.procs[name] = proc
        self.roles[name] = role

    def watch(self, deadline: float) -> dict[str, int]:
        """Until every master exits 0 (then the workers' own exit), or any rank fails."""
        codes: dict[str, int] = {}
        while True:
            for vm, proc in self.procs.items():
                if vm in codes:
                    continue
                rc = proc.poll()
                if rc is None:
                    continue
                codes[vm] = rc
                if rc != 0:
                    self.kill_all()
                    tail = "\n".join(f"    {line}" for line in proc.tail(15))
                    raise RankFailed(
                        f"{vm} ({self.roles[vm].value}) exited with status {rc}; "
                        f"last lines:\n{tail}",
                        hint="the other ranks were stopped; `gcvm logs` and the cluster's debug "
                        "log hold more",
                    )
            if len(codes) == len(self.procs):
                return codes
            if time.monotonic() > deadline:
                waiting = sorted(set(self.procs) - set(codes))
                self.kill_all()
                raise Timeout(
                    f"ranks still running at the deadline: {', '.join(waiting)}",
                    hint="raise --timeout, or lower --repeat/--batch under TCG",
                )
            time.sleep(0.2)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


_print_lock = threading.Lock()


def _printer(vm: str) -> Callable[[str], None]:
    def emit(line: str) -> None:
        with _print_lock:
            console.print(f"[cyan]\\[{vm}][/] {line}", markup=True, highlight=False, soft_wrap=True)

    return emit


def _connect_all(st: state.ClusterState, names: Sequence[str] | None = None) -> dict[str, Remote]:
    """SSH to every VM of the cluster (or those named); the host worker needs none."""
    remotes: dict[str, Remote] = {}
    try:
        for vm in st.vms:
            if names is not None and vm.name not in names:
                continue
            remotes[vm.name] = Remote.connect(st, vm, timeout=30)
    except BaseException:
        for r in remotes.values():
            r.close()
        raise
    return remotes


def _guest_env(st: state.ClusterState) -> dict[str, str]:
    python = st.image.get("python", "/opt/gcvm/venv/bin/python")
    bindir = python.rsplit("/", 1)[0]
    return {
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        # c10d warns on every connection that the guests cannot resolve each other's names
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }


def results_root(name: str) -> Path:
    """Results outlive the cluster (`down` removes its state), so they live beside it."""
    return paths.state_root() / "results" / name


def _host_env(hw: HostWorkerState, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host worker's environment: the bridge as the seed's interface variables say."""
    return hostworker.worker_env(
        hw, {"GLOO_SOCKET_IFNAME": hw.ifname, "TP_SOCKET_IFNAME": hw.ifname, **(extra or {})}
    )


def _open_sampler(st: state.ClusterState) -> tuple[top.Sampler, Any]:
    """A sampler of every VM (libvirt) and the host worker (/proc) over the run."""
    from orchestrator.cluster import Backend
    from orchestrator.errors import HypervisorError

    hv = None
    try:
        hv = Backend().open_hypervisor(st.uri)
    except HypervisorError as exc:
        console.print(f"[yellow]warning:[/] no VM statistics: {exc.message}")
    return top.Sampler(lambda: top.read(st, hv)), hv


def _start_rank(running: _Ranks, st: state.ClusterState, remotes: Mapping[str, Remote],
                node: Node, role: Role, argv: list[str], env: dict[str, str],
                host_env: dict[str, str]) -> None:  # fmt: skip
    if node.host:
        hw = st.worker_host
        assert hw is not None
        running.start_on_host(hw, role, argv, host_env)
    else:
        running.start(remotes[node.name], node.name, role, argv, env)


def prepare_packages(st: state.ClusterState, settings: BenchSettings
                     ) -> tuple[list[packages.HostPackage], dict[str, Any]]:  # fmt: skip
    """The run's packages on the host: a built-in name protected here (one per scheme the modes
    need, into the cluster's state folder, keys into the owner folder), or the folders given."""
    owner = packages.owner_dir(st.name, Path(settings.owner) if settings.owner else None)
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


def _copy_packages(ranks: Sequence[tuple[Node, RankSpec]], remotes: Mapping[str, Remote],
                   pkgs: Sequence[packages.HostPackage],
                   baselines: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Every VM rank gets its files of every package (in parallel, one thread per VM)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(node: Node) -> list[dict[str, Any]]:
        return [packages.copy_to(remotes[node.name], pkg,
                                 packages.copy_plan(pkg, node.role.value, baselines))
                for pkg in pkgs]  # fmt: skip

    vms = [node for node, _ in ranks if not node.host]
    with ThreadPoolExecutor(max_workers=max(1, len(vms))) as pool:
        futures = [pool.submit(one, node) for node in vms]
        return [item for future in futures for item in future.result()]


def _model_args(node: Node, role: Role, pkgs: Sequence[packages.HostPackage],
                broker: packages.RunBroker | packages.ClusterBrokerUse | None,
                tee: str) -> list[str]:  # fmt: skip
    if role is Role.master:
        args = [a for p in pkgs for a in ("--model", packages.guest_folder(p))]
        if broker is not None:
            args += ["--broker", broker.url, "--tee", tee]
        return args
    if node.host:  # the host worker reads the host's own copy
        return [a for p in pkgs for a in ("--package", str(p.folder))]
    return [a for p in pkgs for a in ("--package", packages.guest_folder(p))]


def framework_tee(st: state.ClusterState) -> str:
    """The evidence a master gives the broker: the cluster's TEE in the framework's words."""
    tee = str(st.spec.get("tee", "none"))
    return {"sev-snp": "snp"}.get(tee, tee)


def run_bench(name: str, settings: BenchSettings, out_dir: Path | None = None) -> Path:
    """Run the benchmark across the cluster; returns the folder holding JSON, table and chart."""
    with state.locked(name):
        st = state.load(name)
        tee = framework_tee(st)
        if st.cluster_broker is None:
            packages.check_policy(tee, Path(settings.policy) if settings.policy else None)
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        results_dir = (out_dir or results_root(name)) / run_id
        results_dir.mkdir(parents=True, exist_ok=True)
        guest_dir = f"/var/tmp/gcvm-results/{run_id}"
        guest_python = st.image.get("python", "/opt/gcvm/venv/bin/python")
        hw = st.worker_host
        world = plan_world(st, settings.port, settings.masters)
        pkgs, package_facts = prepare_packages(st, settings)
        baselines = packages.needs_baselines(settings.modes, settings.audit)
        vm_names = [node.name for node, _ in world if not node.host]
        with step(f"connect to {len(vm_names)} VMs over SSH"):
            remotes = _connect_all(st, vm_names)
        running = _Ranks()
        env = _guest_env(st)
        sampler, hv = None, None
        broker: packages.RunBroker | packages.ClusterBrokerUse | None = None
        broker_url: str | None = None
        masters = [node.name for node, rank in world if rank.role is Role.master]
        try:
            with step(f"copy {len(pkgs)} package(s) into {len(vm_names)} VM(s)"):
                copies = _copy_packages(world, remotes, pkgs, baselines)
            owner = Path(package_facts["owner"])
            broker = packages.broker_for(st, packages.broker_resources(pkgs), tee,
                                         Path(settings.policy) if settings.policy else None,
                                         owner / "broker.log")  # fmt: skip
            with step(_broker_step(st)):
                broker.start()
            broker_url = broker.url
            console.print(f"broker: {broker.url} in namespace {st.netns or '(host)'} "
                          f"(as `{shlex.join(broker.argv())}`)")  # fmt: skip
            if broker.insecure:
                console.print(f"[yellow]warning:[/] --tee none: {packages.INSECURE_LABEL}")
            ranks: list[tuple[Node, RankSpec]] = []
            for node, rank in world:
                json_path = f"{guest_dir}/{node.name}.json" if rank.role is Role.master else None
                model_args = _model_args(node, rank.role, pkgs, broker, tee)
                extra = settings.launch_args(json_path, node.cpus, model_args)
                ranks.append((node, replace(rank, extra=extra)))
            sampler, hv = _open_sampler(st)
            with step(
                f"run {settings.model} ({', '.join(settings.modes)}) batch {settings.batch} "
                f"seq {settings.seq} x{settings.repeat} on {len(masters)} master(s)"
            ):
                sampler.start()
                for node, rank in sorted(ranks, key=lambda r: r[1].role is Role.master):
                    python = hw.python if node.host and hw is not None else guest_python
                    argv = rank.argv(python)
                    if rank.role is Role.master:
                        remotes[node.name].run(["mkdir", "-p", guest_dir], timeout=30)
                    where = " (host)" if node.host else ""
                    console.print(f"[dim]{node.name}{where}: {shlex.join(argv)}[/]")
                    host_env = _host_env(hw) if hw is not None else {}
                    _start_rank(running, st, remotes, node, rank.role, argv, env, host_env)
                running.watch(time.monotonic() + settings.timeout)
            usage = sampler.stop()
            with step("collect results"):
                runs: dict[str, dict[str, Any]] = {}
                for vm_name in masters:
                    local = results_dir / f"{vm_name}.json"
                    remotes[vm_name].get(f"{guest_dir}/{vm_name}.json", local)
                    runs[vm_name] = json.loads(local.read_text())
        except BaseException:  # a failed start, a lost connection, Ctrl-C: stop what runs
            running.kill_all()
            raise
        finally:
            if broker is not None:
                broker.stop()
            if sampler is not None:
                sampler.stop()
            if hv is not None:
                hv.close()
            for r in remotes.values():
                r.close()

    verdicts = _broker_verdicts(st, broker)
    document = {
        "settings": asdict(settings),
        "cluster": cluster_facts(st),
        "masters": masters,
        "packages": {**package_facts, "copies": copies},
        "broker": {
            "url": broker_url,
            "argv": broker.argv() if broker else None,
            "insecure": tee == "none",
            "tee": tee,
            "policy": settings.policy,
            "decisions": broker.decisions if broker else [],
        },
        "attestation": verdicts,
        "runs": runs,
        "aggregate": report.aggregate(runs),
        "key_release": report.key_releases(runs),
        "peak_rss_mb": report.peak_rss(runs),
        "resources": usage,
        "resources_note": "CPU in cores (1.0 = one core busy) averaged over the run, and its "
        "peak over 1 s intervals; memory: resident MiB of each VM's QEMU process and of the host "
        "worker's processes, peak over the run",
    }
    (results_dir / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    workers = "host worker" if hw is not None else "worker VMs"
    title = (
        f"{settings.model}, batch {settings.batch} x seq {settings.seq}, TEE "
        f"{st.spec.get('tee', 'none')}, accel {st.host.get('accel', '?')}, {len(masters)} "
        f"master(s), {workers}" + (f" on {hw.device} ({hw.device_name})" if hw is not None else "")
    )
    out.print(report.table(runs, title))
    if len(runs) > 1:
        out.print(report.aggregate_table(runs))
    out.print(report.key_release_table(runs))
    out.print(report.broker_table(verdicts))
    host_cpus = os.cpu_count() or 1
    out.print(top.usage_table(usage, host_cpus, "Resources over the run (per VM, host worker)"))
    out.print(report.peak_rss_table(runs))
    png = report.chart(runs, results_dir / "bench.png", title)
    out.print(f"results: {results_dir / 'bench.json'}")
    out.print(f"chart:   {png}")
    return results_dir


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
    with state.locked(name):
        st = state.load(name)
        hw = st.worker_host
        tee = framework_tee(st)
        if packages_for is not None:
            policy = Path(packages_for.policy) if packages_for.policy else None
            if st.cluster_broker is None:
                packages.check_policy(tee, policy)
        pairs = [(n, r) for n, r in plan_world(st, port) if commands.get(r.role)]
        pkgs: list[packages.HostPackage] = []
        if packages_for is not None:
            pkgs, package_facts = prepare_packages(st, packages_for)
        remotes = _connect_all(st, [n.name for n, _ in pairs if not n.host])
        running = _Ranks()
        broker: packages.RunBroker | packages.ClusterBrokerUse | None = None
        try:
            if packages_for is not None:
                with step(f"copy {len(pkgs)} package(s) into the VMs"):
                    _copy_packages(pairs, remotes, pkgs, packages.needs_baselines(
                        packages_for.modes, False))  # fmt: skip
                owner_log = Path(package_facts["owner"]) / "broker.log"
                broker = packages.broker_for(st, packages.broker_resources(pkgs), tee, policy,
                                             owner_log)  # fmt: skip
                with step(_broker_step(st)):
                    broker.start()
                if broker.insecure:
                    console.print(f"[yellow]warning:[/] --tee none: {packages.INSECURE_LABEL}")
            for node, rank in sorted(pairs, key=lambda p: p[1].role is Role.master):
                seed_env = {**(extra_env or {}), **rank.env(), "GCVM_ROLE": rank.role.value,
                            **_package_env(node, rank.role, pkgs, broker, tee)}  # fmt: skip
                env = {**_guest_env(st), **seed_env}
                host_env = _host_env(hw, seed_env) if hw is not None else {}
                argv = list(commands[rank.role])
                _start_rank(running, st, remotes, node, rank.role, argv, env, host_env)
            running.watch(time.monotonic() + timeout)
        except BaseException:
            running.kill_all()
            raise
        finally:
            if broker is not None:
                broker.stop()
            for r in remotes.values():
                r.close()
    if broker is not None:
        out.print(report.broker_table(_broker_verdicts(st, broker)))


def _broker_step(st: state.ClusterState) -> str:
    """The step that gives a run's keys to a broker: its own, or the cluster's (`up --broker`)."""
    if st.cluster_broker is None:
        return "start the key broker"
    return "give the cluster's key broker the run's keys"


def _broker_verdicts(st: state.ClusterState,
                     broker: packages.RunBroker | packages.ClusterBrokerUse | None,
                     ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The broker's decisions of a run, per master VM (by the address its requests came from)."""
    return report.broker_verdicts(broker.decisions if broker else [],
                                  {str(vm.address): vm.name for vm in st.vms})  # fmt: skip


def _package_env(node: Node, role: Role, pkgs: Sequence[packages.HostPackage],
                 broker: packages.RunBroker | packages.ClusterBrokerUse | None,
                 tee: str) -> dict[str, str]:  # fmt: skip
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


SEED_SHAPE = {"BATCH": "2", "SEQ": "32"}  # the seed scripts' defaults, passed to them explicitly


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


SEED_ENV = {"FORCE_TCP": "1"}  # `gcvm run seed`: TCP only between machines, as bench's --force-tcp
SEED_COMMANDS = {
    Role.worker: ["tee_test_transformer_worker.py"],
    Role.master: ["tee_test_transformer_master.py"],
}


MICRO_READY = "GROUPCOVER_MICRO_SERVING"
MICRO_PORT_OFFSET = 100  # the micro worker listens on --port + this


def _wait_ready(proc: Any, what: str, timeout: float) -> None:
    """Until the micro worker says it serves (torch's import takes ~30 s under TCG)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(line.startswith(MICRO_READY) for line in proc.tail(200)):
            return
        rc = proc.poll()
        if rc is not None:
            tail = "\n".join(f"    {line}" for line in proc.tail(10))
            raise RankFailed(f"the micro worker on {what} exited with status {rc}:\n{tail}")
        time.sleep(0.3)
    raise Timeout(f"the micro worker on {what} did not start within {timeout:.0f} s")


def run_transport_micro(name: str, settings: BenchSettings, out_dir: Path | None = None) -> Path:
    """`gcvm run bench --transport-micro`: the wire per call from master 0's VM to the host worker
    and to a VM (a worker VM, else another master VM), for MiniLM and BERT-base payloads."""
    with state.locked(name):
        st = state.load(name)
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        results_dir = (out_dir or results_root(name)) / f"{run_id}-transport-micro"
        results_dir.mkdir(parents=True, exist_ok=True)
        guest_python = st.image.get("python", "/opt/gcvm/venv/bin/python")
        by_rank = sorted(st.vms, key=lambda v: v.rank)
        client = next((vm for vm in by_rank if vm.role == Role.master), None)
        if client is None:
            raise UsageError(f"cluster {name} has no master VM to measure from")
        hw = st.worker_host
        vm_target = next((vm for vm in by_rank if vm.role == Role.worker), None) or next(
            (vm for vm in by_rank if vm is not client), None
        )
        targets: list[tuple[str, str]] = []  # (node, address)
        if hw is not None:
            targets.append((hw.name, hw.address))
        if vm_target is not None:
            targets.append((vm_target.name, vm_target.address))
        if not targets:
            raise UsageError(f"cluster {name} has nothing to measure to",
                             hint="a host worker, a worker VM or a second VM")  # fmt: skip
        port = settings.port + MICRO_PORT_OFFSET
        names = [client.name] + [n for n, _ in targets if vm_target and n == vm_target.name]
        remotes = _connect_all(st, names)
        documents: dict[str, Any] = {}
        env = _guest_env(st)
        try:
            for target, address in targets:
                serve = ["-m", "groupcover.transport_micro", "--serve", f"{address}:{port}",
                         "--seconds", str(int(settings.timeout))]  # fmt: skip
                running = _Ranks()
                try:
                    if hw is not None and target == hw.name:
                        running.start_on_host(hw, Role.worker, [hw.python, *serve], _host_env(hw))
                    else:
                        running.start(remotes[target], target, Role.worker,
                                      [guest_python, *serve], env)  # fmt: skip
                    with step(f"start a micro worker on {target} ({address}:{port})"):
                        _wait_ready(running.procs[target], target, settings.rpc_timeout)
                    label = f"{client.name} -> {target}" + (" (host)" if target == hw_name(st)
                                                            else " (VM)")  # fmt: skip
                    guest_json = f"/var/tmp/gcvm-results/{run_id}-micro-{target}.json"
                    argv = [guest_python, "-m", "groupcover", "bench", "--transport-micro",
                            "--target", f"{address}:{port}", "--label", label,
                            "--batch", str(settings.batch), "--seq", str(settings.seq),
                            "--repeat", str(settings.repeat), "--threads", "1",
                            "--timeout", str(int(settings.rpc_timeout)),
                            "--json", guest_json]  # fmt: skip
                    with step(f"measure {label}"):
                        remotes[client.name].run(["mkdir", "-p", "/var/tmp/gcvm-results"],
                                                 timeout=30)  # fmt: skip
                        remotes[client.name].run(argv, timeout=settings.timeout, env=env,
                                                 on_line=_printer(client.name))  # fmt: skip
                        local = results_dir / f"{target}.json"
                        remotes[client.name].get(guest_json, local)
                        documents[label] = json.loads(local.read_text())
                finally:
                    running.kill_all()
        finally:
            for r in remotes.values():
                r.close()
    document = {"settings": asdict(settings), "cluster": cluster_facts(st), "runs": documents}
    path = results_dir / "transport-micro.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    out.print(f"results: {path}")
    return results_dir


def hw_name(st: state.ClusterState) -> str | None:
    hw = st.worker_host
    return hw.name if hw is not None else None
