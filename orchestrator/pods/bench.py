"""`gcvm run bench` on a pods cluster: the framework's ranks started in the pods with `podman
exec` (workers first), the masters' JSON copied out with `podman cp`, the same tables.

What differs from the VM clusters: the model is one of the built-in models, protected in each
master's own process (no package, no key broker: the pods have no TEE to attest), and there is
no per-pod resource sampling. Every result says where its key came from.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import report
from orchestrator.errors import GcvmError, UsageError
from orchestrator.pods import lifecycle
from orchestrator.pods.manifests import IFNAME
from orchestrator.run.settings import BenchSettings
from orchestrator.spec import RankSpec, Role
from orchestrator.ui import console, out, step

POD_RESULTS = "/var/tmp/gcvm-results"
# ends what a failed run left running in a container (its PID 1 is `sleep`, which stays)
STOP_RANKS = ("import os, signal\n"
              "for p in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
              "        if b'groupcover' in cmd and int(p) != os.getpid():\n"
              "            os.kill(int(p), signal.SIGKILL)\n"
              "    except OSError:\n"
              "        pass\n")  # fmt: skip


def plan(record: dict[str, Any], settings: BenchSettings, json_dir: str
         ) -> list[tuple[dict[str, Any], list[str]]]:  # fmt: skip
    pods = sorted(record["pods"], key=lambda p: p["rank"])
    masters = [p for p in pods if p["role"] == Role.master.value]
    workers = [p for p in pods if p["role"] == Role.worker.value]
    use = masters[: settings.masters] if settings.masters else masters
    world = use + workers
    ranks = {p["name"]: i for i, p in enumerate(world)}
    planned = []
    for pod in world:
        master = pod["role"] == Role.master.value
        rank = RankSpec(
            role=Role(pod["role"]), rank=ranks[pod["name"]], world_size=len(world),
            master_addr=world[0]["address"], master_port=settings.port, ifname=IFNAME,
            worker=len(use) + masters.index(pod) % len(workers) if master else None,
            extra=settings.launch_args(f"{json_dir}/{pod['name']}.json" if master else None, 1,
                                       ("--model", settings.model) if master else ()),
        )  # fmt: skip
        planned.append((pod, rank.argv(lifecycle.CONTAINER_PYTHON)))
    return planned


def run_bench(name: str, settings: BenchSettings, out_dir: Path | None) -> Path:
    if not settings.builtin:
        raise UsageError("a pods cluster runs the built-in models only (each master protects "
                         "its model in its own process)", hint="--model seed-transformer, "
                         "minilm, bert-base or resnet18")  # fmt: skip
    record = lifecycle.load(name)
    if record.get("phase") != "ready":
        raise GcvmError(f"pods cluster {name} is not ready", hint=f"gcvm down --name {name}")
    podman = lifecycle.podman_for(name, record)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = (out_dir or lifecycle.state.cluster_dir(name) / "results") / run_id
    results.mkdir(parents=True, exist_ok=True)
    json_dir = f"{POD_RESULTS}/{run_id}"
    planned = plan(record, settings, json_dir)
    masters = [pod for pod, _ in planned if pod["role"] == Role.master.value]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    title = (f"{settings.model}, batch {settings.batch} x seq {settings.seq}, pods (podman, "
             f"no TEE), {len(masters)} master(s)")  # fmt: skip
    started = time.monotonic()
    with step(f"run {settings.model} ({', '.join(settings.modes)}) in {len(planned)} pods"):
        try:
            for pod, argv in sorted(planned, key=lambda p: p[0]["role"] != "worker"):
                container = lifecycle.container_of(pod)
                if pod in masters:
                    podman.run("exec", container, "mkdir", "-p", json_dir, timeout=30)
                console.print(f"[dim]{pod['name']}: {shlex.join(argv)}[/]")
                log = open(results / f"{pod['name']}.log", "wb")  # noqa: SIM115 (closed below)
                procs[pod["name"]] = podman.popen("exec", container, *argv, stdout=log,
                                                  stderr=subprocess.STDOUT)  # fmt: skip
                log.close()
            _watch(procs, results, settings.timeout)
        except BaseException:
            for pod, _ in planned:
                podman.run("exec", lifecycle.container_of(pod), lifecycle.CONTAINER_PYTHON,
                           "-c", STOP_RANKS, check=False, timeout=30)  # fmt: skip
            for proc in procs.values():
                proc.kill()
            raise
    runs: dict[str, dict[str, Any]] = {}
    with step("collect results"):
        for pod in masters:
            local = results / f"{pod['name']}.json"
            podman.run("cp", f"{lifecycle.container_of(pod)}:{json_dir}/{pod['name']}.json",
                       str(local))  # fmt: skip
            runs[pod["name"]] = json.loads(local.read_text())
    document = {"settings": asdict(settings), "cluster": {k: record[k] for k in
                ("name", "runtime", "subnet", "image", "pods")}, "masters": [p["name"] for p in
                masters], "runs": runs, "aggregate": report.aggregate(runs),
                "key_release": report.key_releases(runs), "peak_rss_mb": report.peak_rss(runs),
                "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    (results / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    out.print(report.table(runs, title))
    if len(runs) > 1:
        out.print(report.aggregate_table(runs))
    out.print(report.key_release_table(runs))
    out.print(report.peak_rss_table(runs))
    out.print(f"results: {results / 'bench.json'}")
    return results


def _watch(procs: dict[str, subprocess.Popen[bytes]], results: Path, timeout: float) -> None:
    """Until every rank exits; the first that fails (or the timeout) fails the run."""
    deadline = time.monotonic() + timeout
    while procs:
        for name, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del procs[name]
            if code != 0:
                tail = (results / f"{name}.log").read_text(errors="replace").strip()[-600:]
                raise GcvmError(f"{name} exited with {code}:\n{tail}",
                                hint=f"its output: {results / (name + '.log')}")  # fmt: skip
        if time.monotonic() > deadline:
            raise GcvmError(f"the run took over {timeout:.0f} s", hint="raise --timeout")
        time.sleep(0.2)
