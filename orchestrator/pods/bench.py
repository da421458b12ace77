"""`gcvm run bench` on a pods cluster: the model's packages protected on the host and copied
into the pods, the keys released by the owner's key broker over its pinned HTTPS identity, the
framework's ranks started in the pods with `podman exec` (workers first), the masters' JSON
copied out with `podman cp`, the same tables (`orchestrator.pods.session` does the shared part).

What differs from the VM clusters: the masters' pins are files given on their command line (a
runc container has no measured boot), the broker releases keys without attestation (no TEE) and
every result says so, and each pod's CPU and memory come from its cgroup
(`orchestrator.pods.resources`) instead of libvirt.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import packages, report, top
from orchestrator.pods import lifecycle, resources
from orchestrator.pods.manifests import IFNAME
from orchestrator.pods.session import TEE, PodsRun, node
from orchestrator.run import deploy
from orchestrator.run.settings import BenchSettings
from orchestrator.spec import RankSpec, Role
from orchestrator.ui import out, step

POD_RESULTS = "/var/tmp/gcvm-results"
RESOURCES_NOTE = ("CPU in cores (1.0 = one core busy) averaged over the run, and its peak over 1 s "
                  "intervals, from each pod's cgroup (cpuacct.usage); memory: resident MiB "
                  "charged to the pod's cgroup (memory.stat total_rss + total_mapped_file), peak "
                  "over the run")  # fmt: skip


def world(record: dict[str, Any], masters: int | None) -> list[dict[str, Any]]:
    """The run's pods in rank order: the first `masters` masters (all by default), the workers."""
    pods = sorted(record["pods"], key=lambda p: p["rank"])
    all_masters = [p for p in pods if p["role"] == Role.master.value]
    workers = [p for p in pods if p["role"] == Role.worker.value]
    return (all_masters[:masters] if masters else all_masters) + workers


def ranks(record: dict[str, Any], port: int, masters: int | None
          ) -> list[tuple[dict[str, Any], RankSpec]]:  # fmt: skip
    """Each pod's rank: rank 0 (the first master) holds the rendezvous at its own address;
    master i offloads to worker i mod N."""
    pods = world(record, masters)
    use = [p for p in pods if p["role"] == Role.master.value]
    workers = len(pods) - len(use)
    return [(pod, RankSpec(
        role=Role(pod["role"]), rank=i, world_size=len(pods), master_addr=pods[0]["address"],
        master_port=port, ifname=IFNAME,
        worker=len(use) + i % workers if pod["role"] == Role.master.value else None))
        for i, pod in enumerate(pods)]  # fmt: skip


def plan(record: dict[str, Any], settings: BenchSettings, json_dir: str,
         model_args: Any = None) -> list[tuple[dict[str, Any], list[str]]]:  # fmt: skip
    """Each pod's `python -m groupcover launch` argv; `model_args(pod, role)`: its package
    flags (default: the built-in model by name, for a master)."""
    planned = []
    for pod, rank in ranks(record, settings.port, settings.masters):
        master = rank.role is Role.master
        if model_args is None:
            args = ["--model", settings.model] if master else []
        else:
            args = model_args(pod, rank.role)
        extra = settings.launch_args(f"{json_dir}/{pod['name']}.json" if master else None, 1,
                                     args)  # fmt: skip
        planned.append((pod, replace(rank, extra=extra).argv(lifecycle.CONTAINER_PYTHON)))
    return planned


def run_bench(name: str, settings: BenchSettings, out_dir: Path | None) -> Path:
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = (out_dir or lifecycle.state.cluster_dir(name) / "results") / run_id
    results.mkdir(parents=True, exist_ok=True)
    json_dir = f"{POD_RESULTS}/{run_id}"
    started = time.monotonic()
    with PodsRun(name, results) as run:
        record = run.record
        pods = world(record, settings.masters)
        masters = [p for p in pods if p["role"] == Role.master.value]
        baselines = packages.needs_baselines(settings.modes, settings.audit)
        pkgs, package_facts = run.deploy_packages(settings, pods, baselines)
        broker = run.start_broker(pkgs, settings.policy, Path(package_facts["owner"]))

        def model_args(pod: dict[str, Any], role: Role) -> list[str]:
            return deploy.model_args(node(pod), role, pkgs, broker, TEE) + run.pin_args(pod)

        planned = plan(record, settings, json_dir, model_args)
        title = (f"{settings.model}, batch {settings.batch} x seq {settings.seq}, pods "
                 f"(podman, no TEE), {len(masters)} master(s)")  # fmt: skip
        sampler = top.Sampler(resources.reader(run.podman, {"pods": pods}))
        run.sampler = sampler
        with step(f"run {settings.model} ({', '.join(settings.modes)}) in {len(planned)} pods"):
            sampler.start()
            for pod, argv in sorted(planned, key=lambda p: p[0]["role"] != "worker"):
                if pod in masters:
                    run.target(pod).run(["mkdir", "-p", json_dir], timeout=30)
                run.start(pod, argv)
            run.watch(settings.timeout)
        usage = sampler.stop()
        runs: dict[str, dict[str, Any]] = {}
        with step("collect results"):
            for pod in masters:
                local = results / f"{pod['name']}.json"
                run.podman.run("cp", f"{lifecycle.container_of(pod)}:{json_dir}/{pod['name']}"
                               ".json", str(local))  # fmt: skip
                runs[pod["name"]] = json.loads(local.read_text())
    verdicts = run.verdicts()
    document = {"settings": asdict(settings), "cluster": {k: record.get(k) for k in
                ("name", "runtime", "subnet", "image", "pods", "trust", "pins")},
                "masters": [p["name"] for p in masters], "packages": package_facts,
                "broker": run.broker_facts(settings.policy), "attestation": verdicts,
                "runs": runs, "aggregate": report.aggregate(runs),
                "key_release": report.key_releases(runs), "peak_rss_mb": report.peak_rss(runs),
                "resources": usage, "resources_note": RESOURCES_NOTE,
                "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    (results / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    out.print(report.table(runs, title))
    if len(runs) > 1:
        out.print(report.aggregate_table(runs))
    out.print(report.key_release_table(runs))
    out.print(report.broker_table(verdicts))
    out.print(top.usage_table(usage, os.cpu_count() or 1, "Resources over the run (per pod)"))
    out.print(report.peak_rss_table(runs))
    out.print(f"results: {results / 'bench.json'}")
    return results
