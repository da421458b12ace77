"""`gcvm run bench --transport-micro` on a pods cluster: the wire per call from master 0's pod to
a worker pod (veth, the pods' bridge, veth: what the pod network adds), for MiniLM and BERT-base
payloads; the same client and micro worker as on VMs (`orchestrator.run.micro`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import GcvmError, Timeout
from orchestrator.pods import lifecycle
from orchestrator.pods.bench import world
from orchestrator.pods.session import PodsRun
from orchestrator.run.micro import MICRO_PORT_OFFSET, MICRO_READY, MICRO_SETTINGS
from orchestrator.run.ranks import printer
from orchestrator.run.settings import BenchSettings, framework_args
from orchestrator.spec import Role
from orchestrator.ui import out, step

PYTHON = lifecycle.CONTAINER_PYTHON


def run_transport_micro(name: str, settings: BenchSettings, out_dir: Path | None) -> Path:
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = out_dir or lifecycle.state.cluster_dir(name) / "results"
    results = root / f"{run_id}-transport-micro"
    results.mkdir(parents=True, exist_ok=True)
    with PodsRun(name, results) as run:
        pods = world(run.record, None)
        client = next(p for p in pods if p["role"] == Role.master.value)
        target = next(p for p in pods if p["role"] == Role.worker.value)
        address = f"{target['address']}:{settings.port + MICRO_PORT_OFFSET}"
        run.start(target, [PYTHON, "-m", "groupcover.measure.transport_micro", "--serve",
                           address, "--seconds", str(int(settings.timeout))])  # fmt: skip
        with step(f"start a micro worker in {target['name']} ({address})"):
            _wait_ready(run, target["name"], results / f"{target['name']}.log",
                        settings.rpc_timeout)  # fmt: skip
        label = f"{client['name']} -> {target['name']} (pod to pod)"
        pod_json = f"/var/tmp/gcvm-results/{run_id}-micro.json"
        argv = [PYTHON, "-m", "groupcover", "bench", "--transport-micro", "--target", address,
                "--label", label, *framework_args(settings, MICRO_SETTINGS, threads=1),
                "--json", pod_json]  # fmt: skip
        with step(f"measure {label}"):
            pod = run.target(client)
            pod.run(["mkdir", "-p", "/var/tmp/gcvm-results"], timeout=30)
            done = pod.run(argv, timeout=settings.timeout)
            for line in done.stdout.splitlines():
                printer(client["name"])(line)
            local = results / "transport-micro-pods.json"
            run.podman.run("cp", f"{lifecycle.container_of(client)}:{pod_json}", str(local))
        run.stop_ranks()
    document: dict[str, Any] = {"settings": asdict(settings), "cluster": {
        k: run.record.get(k) for k in ("name", "runtime", "subnet", "image", "pods")},
        "runs": {label: json.loads(local.read_text())}}  # fmt: skip
    path = results / "transport-micro.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    out.print(f"results: {path}")
    return results


def _wait_ready(run: PodsRun, name: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if any(line.startswith(MICRO_READY) for line in text.splitlines()):
            return
        if run.procs[name].poll() is not None:
            raise GcvmError(f"the micro worker in {name} exited:\n{text.strip()[-600:]}")
        time.sleep(0.3)
    raise Timeout(f"the micro worker in {name} did not start within {timeout:.0f} s")
