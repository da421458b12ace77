"""The cluster's key broker (`gcvm up --broker`): `gcvm broker serve` as a process of this host,
for the cluster's lifetime, inside the cluster's namespace on the bridge's host-side address.

It serves the model keys from a repository folder in the owner folder
(`OWNER/repository/<repo>/<type>/<tag>`, Trustee's local file system layout), looked up at each
request, so `gcvm run bench|seed` only add the keys of the packages they deploy; every decision
is appended to `OWNER/broker-decisions.jsonl`, which the runs read back for their results. A
per-run broker (`run bench` without one) is the in-process `orchestrator.runbroker.RunBroker`.
Started detached (its own session), recorded in the cluster state before it starts, so `down`
(and a failed `up`) stops it; `down` checks the pid still runs this broker before signalling.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import GcvmError

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
_LISTENING = re.compile(r"broker listening on (https?://[^\s]+) ")


class BrokerError(GcvmError):
    pass


@dataclass(frozen=True)
class ClusterBrokerState:
    owner: str  # the owner folder: repository, log, decisions
    address: str  # the bridge's host-side address it binds
    netns: str | None
    policy: str | None  # None: --insecure-no-attestation (clusters without a TEE)
    identity: str | None = None  # its TLS certificate and token key (orchestrator.ownerid)
    pid: int | None = None
    url: str | None = None
    started: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterBrokerState:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def repository(self) -> Path:
        return Path(self.owner) / "repository"

    @property
    def log(self) -> Path:
        return Path(self.owner) / "broker.log"

    @property
    def decisions(self) -> Path:
        return Path(self.owner) / "broker-decisions.jsonl"

    @property
    def insecure(self) -> bool:
        return self.policy is None


def argv(b: ClusterBrokerState) -> list[str]:
    """The `gcvm broker serve` command line it runs (port 0: any free port)."""
    cmd = [sys.executable, "-m", "orchestrator", "broker", "serve", "--listen",
           f"{b.address}:0", "--repository", str(b.repository), "--decisions",
           str(b.decisions), "--log", str(b.log)]  # fmt: skip
    cmd += ["--policy", b.policy] if b.policy else ["--insecure-no-attestation"]
    if b.identity:
        cmd += ["--identity", b.identity]
    return cmd


def start(b: ClusterBrokerState, timeout: float = START_TIMEOUT_S) -> ClusterBrokerState:
    """Starts it and waits until it listens; returns the state with its pid and URL."""
    from orchestrator import netns

    Path(b.owner).mkdir(parents=True, exist_ok=True, mode=0o700)
    b.repository.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = b.log.with_suffix(".out")
    with out.open("wb") as sink:
        proc = subprocess.Popen(netns.exec_argv(b.netns, argv(b)), stdin=subprocess.DEVNULL,
                                stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    started = replace_pid(b, proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        found = _LISTENING.search(" ".join(text.split()))
        if found:
            return ClusterBrokerState(**{**started.to_dict(), "url": found[1]})
        if proc.poll() is not None:
            tail = "\n".join(f"    {line}" for line in text.strip().splitlines()[-5:])
            raise BrokerError(f"the cluster's key broker exited with status {proc.returncode}:"
                              f"\n{tail}", hint=f"its output: {out}")  # fmt: skip
        time.sleep(0.2)
    stop(started)
    raise BrokerError(f"the cluster's key broker did not listen within {timeout:.0f} s",
                      hint=f"its output: {out}")  # fmt: skip


def start_recorded(b: ClusterBrokerState, record: Callable[[ClusterBrokerState], None]
                   ) -> ClusterBrokerState:  # fmt: skip
    """`up --broker` (VMs and pods): the broker recorded in the cluster's state before it starts
    (so a failure from here on, and `down`, stop it) and again with its pid and URL."""
    from orchestrator import ui

    record(b)
    with ui.step(f"start the key broker on {b.address}"):
        try:
            b = start(b)
        finally:
            record(b)
        ui.info(f"key broker (a demo broker: it runs on this TEE host; in production the "
                f"owner's machine runs it): {b.url}, pid {b.pid}, "
                + (f"policy {b.policy}" if b.policy else "without attestation (--tee none)")
                + f"; keys served from {b.repository}")  # fmt: skip
    return b


def for_owner(owner: Path, address: str, netns_name: str | None, policy: str | None
              ) -> ClusterBrokerState:  # fmt: skip
    """The cluster broker of an owner folder: its identity (the one the cluster pins), bound to
    `address` in the cluster's namespace."""
    from orchestrator import ownerid

    return ClusterBrokerState(owner=str(owner), address=address, netns=netns_name,
                              identity=str(owner / ownerid.BROKER_DIR),
                              policy=str(Path(policy).resolve()) if policy else None)  # fmt: skip


def replace_pid(b: ClusterBrokerState, pid: int) -> ClusterBrokerState:
    return ClusterBrokerState(**{**b.to_dict(), "pid": pid, "started": time.time()})


def _is_ours(pid: int, b: ClusterBrokerState) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmdline and str(b.decisions).encode() in cmdline


def alive(b: ClusterBrokerState) -> bool:
    return b.pid is not None and _is_ours(b.pid, b)


def stop(b: ClusterBrokerState | None) -> bool:
    """Stops it (its whole session) if it still runs; True when there was one to stop."""
    if b is None or b.pid is None or not _is_ours(b.pid, b):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(b.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and _is_ours(b.pid, b):
        time.sleep(0.1)
    if _is_ours(b.pid, b):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(b.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(b.pid, os.WNOHANG)
    return True


def install_key(b: ClusterBrokerState, resource: str, key: Path) -> Path:
    """Puts a model key where the running broker serves `resource` (0600, atomically)."""
    from orchestrator.keys import write_secret

    target = b.repository.joinpath(*resource.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(target, key.read_bytes())
    return target


def decisions_since(b: ClusterBrokerState, since: float) -> list[dict[str, Any]]:
    """The decisions it made from `since` (UNIX time) on."""
    try:
        lines = b.decisions.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict) and float(d.get("time", 0)) >= since:
                found.append(d)
    return found


def remove_repository(b: ClusterBrokerState) -> None:
    """`down`: the keys it served go (the owner keeps the originals); log and decisions stay."""
    shutil.rmtree(b.repository, ignore_errors=True)
