"""`gcvm run bench --transport-micro`: the wire per call from master 0's VM to the host worker
and to a VM (a worker VM, else another master VM), for MiniLM and BERT-base payloads. What
differs from the other verbs: a micro worker per target, and the client run from master 0."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import Timeout, UsageError
from orchestrator.run.ranks import RankFailed, printer
from orchestrator.run.session import RunSession
from orchestrator.run.settings import BenchSettings, framework_args
from orchestrator.run.world import (
    Node,
    cluster_facts,
    guest_env,
    guest_python,
    host_env,
    hw_name,
    results_root,
)
from orchestrator.spec import Role
from orchestrator.ui import out, step

MICRO_READY = "GROUPCOVER_MICRO_SERVING"
MICRO_PORT_OFFSET = 100  # the micro worker listens on --port + this
MICRO_SETTINGS = ("batch", "seq", "repeat", "threads", "rpc_timeout")  # the client's workload


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
    with RunSession(name) as run:
        st, hw = run.st, run.hw
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        results_dir = (out_dir or results_root(name)) / f"{run_id}-transport-micro"
        results_dir.mkdir(parents=True, exist_ok=True)
        python = guest_python(st)
        by_rank = sorted(st.vms, key=lambda v: v.rank)
        client = next((vm for vm in by_rank if vm.role == Role.master), None)
        if client is None:
            raise UsageError(f"cluster {name} has no master VM to measure from")
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
        remotes = run.connect(
            [client.name] + [n for n, _ in targets if vm_target and n == vm_target.name]
        )
        documents: dict[str, Any] = {}
        env = guest_env(st)
        for target, address in targets:
            serve = ["-m", "groupcover.measure.transport_micro", "--serve", f"{address}:{port}",
                     "--seconds", str(int(settings.timeout))]  # fmt: skip
            on_host = hw is not None and target == hw.name
            try:
                run.start(Node(target, Role.worker, on_host, 0), Role.worker,
                          [hw.python if on_host and hw else python, *serve], env,
                          host_env(hw) if on_host and hw else {})  # fmt: skip
                with step(f"start a micro worker on {target} ({address}:{port})"):
                    _wait_ready(run.ranks.procs[target], target, settings.rpc_timeout)
                label = f"{client.name} -> {target}" + (" (host)" if target == hw_name(st)
                                                        else " (VM)")  # fmt: skip
                guest_json = f"/var/tmp/gcvm-results/{run_id}-micro-{target}.json"
                argv = [python, "-m", "groupcover", "bench", "--transport-micro",
                        "--target", f"{address}:{port}", "--label", label,
                        *framework_args(settings, MICRO_SETTINGS, threads=1),
                        "--json", guest_json]  # fmt: skip
                with step(f"measure {label}"):
                    remotes[client.name].run(["mkdir", "-p", "/var/tmp/gcvm-results"],
                                             timeout=30)  # fmt: skip
                    remotes[client.name].run(argv, timeout=settings.timeout, env=env,
                                             on_line=printer(client.name))  # fmt: skip
                    local = results_dir / f"{target}.json"
                    remotes[client.name].get(guest_json, local)
                    documents[label] = json.loads(local.read_text())
            finally:
                run.ranks.kill_all()
    document = {"settings": asdict(settings), "cluster": cluster_facts(st), "runs": documents}
    path = results_dir / "transport-micro.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    out.print(f"results: {path}")
    return results_dir
