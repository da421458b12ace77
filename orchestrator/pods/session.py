"""The body `gcvm run bench` and `gcvm run seed` share on a pods cluster: the cluster's lock and
record, the run's packages (protected on the host or given, copied into the pods with `podman
cp`), the key broker (the cluster's, `up --broker`, or one for the run, in the cluster's
namespace on the pods' bridge), the ranks started with `podman exec` (workers first) and stopped
on every way out. The VM runtime's code does the work: `orchestrator.run.deploy` (packages,
owner folder, the ranks' package flags), `orchestrator.runbroker` (brokers), `orchestrator.
packages` (copies); this module is what a pod needs instead of SSH.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from orchestrator import ownerid, packages, report, runbroker, state, top
from orchestrator.errors import GcvmError
from orchestrator.pods import lifecycle
from orchestrator.run import deploy
from orchestrator.run.settings import BenchSettings
from orchestrator.run.world import Node
from orchestrator.spec import Role
from orchestrator.ui import console, step

TEE = "none"  # the framework's TEE in a runc container
# ends what a failed run left running in a container (its PID 1 is `sleep`, which stays)
STOP_RANKS = ("import os, signal\n"
              "for p in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
              "        if b'groupcover' in cmd and int(p) != os.getpid():\n"
              "            os.kill(int(p), signal.SIGKILL)\n"
              "    except OSError:\n"
              "        pass\n")  # fmt: skip


def node(pod: dict[str, Any]) -> Node:
    return Node(pod["name"], Role(pod["role"]), False, 1)


class PodsRun:
    """One run verb on pods cluster `name`; a context manager (see the module's docstring)."""

    record: dict[str, Any]

    def __init__(self, name: str, logs: Path) -> None:
        self.name, self.logs = name, logs
        self.broker: deploy.Broker | None = None
        self.sampler: top.Sampler | None = None  # stopped on every way out
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[dict[str, Any]] = []
        self._cleanup = ExitStack()

    def __enter__(self) -> PodsRun:
        with ExitStack() as stack:
            stack.enter_context(state.locked(self.name))
            stack.callback(self._stop_broker)
            stack.callback(self._stop_sampler)
            self.record = lifecycle.load(self.name)
            if self.record.get("phase") != "ready":
                raise GcvmError(f"pods cluster {self.name} is not ready",
                                hint=f"gcvm down --name {self.name}")  # fmt: skip
            self.podman = lifecycle.podman_for(self.name, self.record)
            self.cluster = lifecycle.PodsCluster.of(self.record)
            self._cleanup = stack.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        try:
            if exc_type is not None:
                self.stop_ranks()
        finally:
            self._cleanup.__exit__(exc_type, exc, tb)

    # ---- packages and the broker -------------------------------------------------------------

    def deploy_packages(self, settings: BenchSettings, pods: Sequence[dict[str, Any]],
                        baselines: bool
                        ) -> tuple[list[packages.HostPackage], dict[str, Any]]:  # fmt: skip
        """The run's packages on the host (`run.deploy.prepare_packages`), copied into `pods`
        (a master everything but the key, a worker the manifest and published weights)."""
        pkgs, facts = deploy.prepare_packages(self.cluster, settings)  # type: ignore[arg-type]
        with step(f"copy {len(pkgs)} package(s) into {len(pods)} pod(s) (podman cp)"):
            facts["copies"] = [
                packages.copy_to(self.target(pod), pkg,
                                 packages.copy_plan(pkg, pod["role"], baselines))
                for pod in pods for pkg in pkgs
            ]  # fmt: skip
        return pkgs, facts

    def start_broker(self, pkgs: Sequence[packages.HostPackage], policy: str | None,
                     owner: Path) -> deploy.Broker:  # fmt: skip
        """The run's keys to the cluster's broker, or to a broker of the run's own, with the
        owner's broker identity (the one the masters pin)."""
        self.broker = runbroker.broker_for(
            self.cluster, packages.broker_resources(pkgs), TEE, Path(policy) if policy else None,
            owner / "broker.log", owner / ownerid.BROKER_DIR)  # fmt: skip
        with step(deploy.broker_step(self.cluster)):  # type: ignore[arg-type]
            self.broker.start()
        console.print(f"broker: {self.broker.url} in namespace {self.record['netns']} "
                      f"(as `{shlex.join(self.broker.argv())}`)")  # fmt: skip
        console.print(f"[yellow]warning:[/] pods without a TEE: {packages.INSECURE_LABEL}")
        return self.broker

    def pin_args(self, pod: dict[str, Any]) -> list[str]:
        """A master's pins as the framework's flags (not measured in a runc container)."""
        pins = self.record.get("pins") or {}
        if pod["role"] != Role.master.value or not pins:
            return []
        return ["--broker-cert", pins["broker_cert"], "--owner-key", pins["owner_key"]]

    def pin_env(self, pod: dict[str, Any]) -> dict[str, str]:
        """The same pins for the seed scripts (BROKER_CERT, OWNER_KEY)."""
        pins = self.record.get("pins") or {}
        if pod["role"] != Role.master.value or not pins:
            return {}
        return {"BROKER_CERT": pins["broker_cert"], "OWNER_KEY": pins["owner_key"]}

    def verdicts(self) -> dict[str, dict[str, Any]]:
        """The broker's decisions of the run, per master pod (by its address)."""
        decisions = self.broker.decisions if self.broker else []
        return report.broker_verdicts(decisions, {p["address"]: p["name"]
                                                  for p in self.record["pods"]})  # fmt: skip

    def broker_facts(self, policy: str | None) -> dict[str, Any]:
        assert self.broker is not None
        return {"url": self.broker.url, "argv": self.broker.argv(), "insecure": True, "tee": TEE,
                "policy": policy, "decisions": self.broker.decisions}  # fmt: skip

    # ---- ranks -------------------------------------------------------------------------------

    def target(self, pod: dict[str, Any]) -> lifecycle.PodTarget:
        return lifecycle.PodTarget(self.podman, pod["name"], lifecycle.container_of(pod))

    def start(self, pod: dict[str, Any], argv: Sequence[str],
              env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """`podman exec` of one rank (its output into LOGS/<pod>.log)."""
        flags = [a for k, v in sorted((env or {}).items()) for a in ("-e", f"{k}={v}")]
        console.print(f"[dim]{pod['name']}: {shlex.join(argv)}[/]")
        self.started.append(pod)
        with open(self.logs / f"{pod['name']}.log", "wb") as log:
            self.procs[pod["name"]] = self.podman.popen(
                "exec", *flags, lifecycle.container_of(pod), *argv, stdout=log,
                stderr=subprocess.STDOUT)  # fmt: skip

    def watch(self, timeout: float) -> None:
        """Until every rank exits; the first that fails (or the timeout) fails the run."""
        deadline = time.monotonic() + timeout
        procs = dict(self.procs)
        while procs:
            for name, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[name]
                if code != 0:
                    log = self.logs / f"{name}.log"
                    tail = log.read_text(errors="replace").strip()[-600:]
                    raise GcvmError(f"{name} exited with {code}:\n{tail}",
                                    hint=f"its output: {log}")  # fmt: skip
            if time.monotonic() > deadline:
                raise GcvmError(f"the run took over {timeout:.0f} s", hint="raise --timeout")
            time.sleep(0.2)

    def stop_ranks(self) -> None:
        """Ends the ranks still running (a failed run's, a micro worker's)."""
        for pod in self.started:
            self.podman.run("exec", lifecycle.container_of(pod), lifecycle.CONTAINER_PYTHON,
                            "-c", STOP_RANKS, check=False, timeout=30)  # fmt: skip
        for proc in self.procs.values():
            proc.kill()

    def _stop_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def _stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()
