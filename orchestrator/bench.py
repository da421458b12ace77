"""`gcvm run`: the framework's ranks across the cluster's VMs.

The orchestrator computes each rank's settings from the cluster state (rendezvous address, the
guest's own interface name, the worker each master offloads to) and starts the framework's single
entry point, `python -m groupcover launch ...`, over SSH: workers first, then masters. It never
imports the framework; it reads back the JSON each master writes.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import paths, report, state
from orchestrator.errors import GcvmError, Timeout, UsageError
from orchestrator.remote import Remote, RemoteProcess
from orchestrator.spec import MAX_TIMEOUT_S, RankSpec, Role, VmSpec, check_timeout, plan_ranks
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
MODELS = ("minilm", "bert-base", "seed-transformer", "resnet18")


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
    timeout: float = 3600.0  # the whole run, enforced here
    rpc_timeout: float = 600.0  # each rank's rendezvous and per-call deadline (TCG is slow)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise UsageError(
                f"unknown model {self.model!r}", hint=f"choose one of {', '.join(MODELS)}"
            )
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

    def launch_args(self, json_path: str | None, threads: int) -> tuple[str, ...]:
        args = [
            "--model",
            self.model,
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


def _vm_specs(st: state.ClusterState) -> list[VmSpec]:
    """Just enough of each VM's spec to plan the ranks (roles, ranks, addresses)."""
    return [
        VmSpec(
            cluster=st.name,
            name=vm.name,
            role=Role(vm.role),
            rank=vm.rank,
            index=vm.index,
            tee=vm.tee,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            address=vm.address,
            prefix=0,
            gateway="",
            mac=vm.mac,
            uuid="",
            disk=Path(),
            seed=Path(),
            serial_log=Path(),
        )
        for vm in sorted(st.vms, key=lambda v: v.rank)
    ]


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
    }


class _Ranks:
    """The running ranks: started in order, watched together, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, RemoteProcess] = {}
        self.roles: dict[str, Role] = {}

    def start(
        self, remote: Remote, vm: str, role: Role, argv: Sequence[str], env: dict[str, str] | None
    ) -> None:
        self.procs[vm] = remote.start(list(argv), env=env, on_line=_printer(vm))
        self.roles[vm] = role

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


def _connect_all(st: state.ClusterState) -> dict[str, Remote]:
    remotes: dict[str, Remote] = {}
    try:
        for vm in st.vms:
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


def run_bench(name: str, settings: BenchSettings, out_dir: Path | None = None) -> Path:
    """Run the benchmark across the cluster; returns the folder holding JSON, table and chart."""
    with state.locked(name):
        st = state.load(name)
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        results_dir = (out_dir or results_root(name)) / run_id
        results_dir.mkdir(parents=True, exist_ok=True)
        guest_dir = f"/var/tmp/gcvm-results/{run_id}"
        python = st.image.get("python", "/opt/gcvm/venv/bin/python")
        by_name = {vm.name: vm for vm in st.vms}
        ifnames = {vm.name: vm.ifname for vm in st.vms}
        plain = plan_ranks(_vm_specs(st), settings.port, ifnames)
        ranks: list[tuple[str, RankSpec]] = []
        vm_names = [vm.name for vm in sorted(st.vms, key=lambda v: v.rank)]
        for vm_name, rank in zip(vm_names, plain, strict=True):
            json_path = f"{guest_dir}/{vm_name}.json" if rank.role is Role.master else None
            extra = settings.launch_args(json_path, by_name[vm_name].vcpus)
            ranks.append((vm_name, RankSpec(**{**asdict(rank), "role": rank.role, "extra": extra})))

        with step(f"connect to {len(st.vms)} VMs over SSH"):
            remotes = _connect_all(st)
        running = _Ranks()
        env = _guest_env(st)
        try:
            with step(
                f"run {settings.model} ({', '.join(settings.modes)}) batch {settings.batch} "
                f"seq {settings.seq} x{settings.repeat}"
            ):
                for vm_name, rank in sorted(ranks, key=lambda r: r[1].role is Role.master):
                    remote = remotes[vm_name]
                    if rank.role is Role.master:
                        remote.run(["mkdir", "-p", guest_dir], timeout=30)
                    console.print(f"[dim]{vm_name}: {shlex.join(rank.argv(python))}[/]")
                    running.start(remote, vm_name, rank.role, rank.argv(python), env)
                running.watch(time.monotonic() + settings.timeout)
            with step("collect results"):
                runs: dict[str, dict[str, Any]] = {}
                for vm_name, rank in ranks:
                    if rank.role is not Role.master:
                        continue
                    local = results_dir / f"{vm_name}.json"
                    remotes[vm_name].get(f"{guest_dir}/{vm_name}.json", local)
                    runs[vm_name] = json.loads(local.read_text())
        except BaseException:  # a failed start, a lost connection, Ctrl-C: stop what runs
            running.kill_all()
            raise
        finally:
            for r in remotes.values():
                r.close()

    document = {
        "settings": asdict(settings),
        "cluster": cluster_facts(st),
        "runs": runs,
        "aggregate": report.aggregate(runs),
    }
    (results_dir / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    title = (
        f"{settings.model}, batch {settings.batch} x seq {settings.seq}, TEE "
        f"{st.spec.get('tee', 'none')}, accel {st.host.get('accel', '?')}, {len(st.vms)} VMs"
    )
    out.print(report.table(runs, title))
    if len(runs) > 1:
        out.print(report.aggregate_table(runs))
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
) -> None:
    """Run a command per role on its VMs with each rank's seed environment (RANK, WORLD_SIZE,
    WORKER, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME, GCVM_ROLE): workers
    first, then masters, as the seed's instructions start them."""
    if not any(commands.values()):
        raise UsageError("no command given", hint="gcvm run exec -- CMD ARGS...")
    check_timeout("--timeout", timeout)
    with state.locked(name):
        st = state.load(name)
        ifnames = {vm.name: vm.ifname for vm in st.vms}
        plain = plan_ranks(_vm_specs(st), port, ifnames)
        vm_names = [vm.name for vm in sorted(st.vms, key=lambda v: v.rank)]
        remotes = _connect_all(st)
        running = _Ranks()
        try:
            pairs = [(n, r) for n, r in zip(vm_names, plain, strict=True) if commands.get(r.role)]
            for vm_name, rank in sorted(pairs, key=lambda p: p[1].role is Role.master):
                env = {
                    **_guest_env(st),
                    **(extra_env or {}),
                    **rank.env(),
                    "GCVM_ROLE": rank.role.value,
                }
                running.start(remotes[vm_name], vm_name, rank.role, commands[rank.role], env)
            running.watch(time.monotonic() + timeout)
        except BaseException:
            running.kill_all()
            raise
        finally:
            for r in remotes.values():
                r.close()


SEED_COMMANDS = {
    Role.worker: ["tee_test_transformer_worker.py"],
    Role.master: ["tee_test_transformer_master.py"],
}
