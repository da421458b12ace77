"""`gcvm run bench`: the framework's modes side by side across the VMs; a table, JSON and a
chart. What differs from the other verbs: the framework's ranks with the workload's flags, the
results collected from the masters and the report."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import packages, report, top
from orchestrator.errors import UsageError
from orchestrator.run import deploy
from orchestrator.run.session import RunSession
from orchestrator.run.settings import BenchSettings
from orchestrator.run.world import (
    Node,
    cluster_facts,
    guest_env,
    guest_python,
    host_env,
    plan_world,
    results_root,
    workers_first,
)
from orchestrator.spec import RankSpec, Role
from orchestrator.ui import console, out, step


def run_bench(name: str, settings: BenchSettings, out_dir: Path | None = None) -> Path:
    """Run the benchmark across the cluster; returns the folder holding JSON, table and chart."""
    with RunSession(name) as run:
        st, hw, tee = run.st, run.hw, run.tee
        run.check_policy(settings.policy)
        if settings.seed is not None and any(vm.locked for vm in st.vms):
            raise UsageError(
                f"--seed {settings.seed} on locked masters: their secrets and masks come from "
                "the OS (a seed the host chose would let the worker predict the masks)",
                hint="leave out --seed",
            )
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        results_dir = (out_dir or results_root(name)) / run_id
        results_dir.mkdir(parents=True, exist_ok=True)
        guest_dir = f"/var/tmp/gcvm-results/{run_id}"
        world = plan_world(st, settings.port, settings.masters)
        pkgs, package_facts = deploy.prepare_packages(st, settings)
        baselines = packages.needs_baselines(settings.modes, settings.audit)
        vm_names = [node.name for node, _ in world if not node.host]
        with step(f"connect to {len(vm_names)} VMs over SSH"):
            remotes = run.connect(vm_names)
        env = guest_env(st)
        masters = [node.name for node, rank in world if rank.role is Role.master]
        with step(f"copy {len(pkgs)} package(s) into {len(vm_names)} VM(s)"):
            copies = deploy.copy_packages(world, remotes, pkgs, baselines)
        broker = run.start_broker(pkgs, settings.policy, Path(package_facts["owner"]),
                                  announce=True)  # fmt: skip
        ranks: list[tuple[Node, RankSpec]] = []
        for node, rank in world:
            json_path = f"{guest_dir}/{node.name}.json" if rank.role is Role.master else None
            model_args = deploy.model_args(node, rank.role, pkgs, broker, tee)
            extra = settings.launch_args(json_path, node.cpus, model_args)
            ranks.append((node, replace(rank, extra=extra)))
        sampler = run.sample()
        with step(
            f"run {settings.model} ({', '.join(settings.modes)}) batch {settings.batch} "
            f"seq {settings.seq} x{settings.repeat} on {len(masters)} master(s)"
        ):
            sampler.start()
            for node, rank in workers_first(ranks):
                python = hw.python if node.host and hw is not None else guest_python(st)
                argv = rank.argv(python)
                if rank.role is Role.master:
                    remotes[node.name].run(["mkdir", "-p", guest_dir], timeout=30)
                where = " (host)" if node.host else ""
                console.print(f"[dim]{node.name}{where}: {shlex.join(argv)}[/]")
                run.start(node, rank.role, argv, env, host_env(hw) if hw is not None else {})
            run.watch(settings.timeout)
        usage = sampler.stop()
        with step("collect results"):
            runs: dict[str, dict[str, Any]] = {}
            for vm_name in masters:
                local = results_dir / f"{vm_name}.json"
                remotes[vm_name].get(f"{guest_dir}/{vm_name}.json", local)
                runs[vm_name] = json.loads(local.read_text())

    verdicts = deploy.broker_verdicts(st, broker)
    document = {
        "settings": asdict(settings),
        "cluster": cluster_facts(st),
        "masters": masters,
        "packages": {**package_facts, "copies": copies},
        "broker": {
            "url": broker.url,
            "argv": broker.argv(),
            "insecure": tee == "none",
            "tee": tee,
            "policy": settings.policy,
            "decisions": broker.decisions,
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
