"""`up`'s waiting half: every VM reachable over SSH, its TEE checked, systemd up, code installed."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator import deploy, state, ui
from orchestrator.cluster.backend import Guest
from orchestrator.cluster.create import _Up
from orchestrator.cluster.guestfacts import GUEST_FACTS, agent_facts, parse_guest_facts, serial_tail
from orchestrator.cluster.parallel import _parallel, check
from orchestrator.errors import (
    GcvmError,
    RemoteError,
    Timeout,
)
from orchestrator.spec import VmSpec
from orchestrator.state import ClusterState, VmState

# SSH attempts are cut into slices this long, so that a cancelled VM notices within one.
CONNECT_SLICE_S = 10.0
# How long a failed wait gives the other VMs' threads to notice (one slice and some).
READY_GRACE_S = 20.0


def _ready(run: _Up, vms: list[VmSpec], image: Any) -> ClusterState:
    assert run.st is not None
    st = run.st
    deadline = time.monotonic() + run.timeout
    wheel_dir = run.dir / "wheels"
    with ui.step("build the project's wheel"):
        wheel = run.backend.build_wheel(wheel_dir)
    with ui.step(
        f"wait for {len(vms)} VMs (SSH with pinned host keys, systemd), install {wheel.name}"
    ):
        cancel = threading.Event()
        ready = _parallel(
            lambda vm: _vm_ready(run, st, vm, wheel, deadline, cancel),
            st.vms,
            "ready",
            cancel=cancel,
            grace=READY_GRACE_S,
        )
    st = replace(st, vms=ready, phase="ready")
    for vm in st.vms:
        ui.info(
            f"{vm.name}: {vm.address} on {vm.ifname or '?'}, TEE requested {vm.tee}, "
            f"guest reports {vm.tee_verified}"
        )
    state.save(st)
    run.st = st
    return st


def _locked_ready(vm: VmState, st: ClusterState, timeout: float, deadline: float,
                  cancel: threading.Event | None) -> VmState:  # fmt: skip
    """A locked master is ready when its job agent answers and says the measured command line
    locks it; no SSH, and no code is installed (the framework is on the verified code disk)."""
    from orchestrator.agentclient import LockedGuest

    start = time.monotonic()
    guest = LockedGuest(vm.name, vm.address, st.netns)
    try:
        health = guest.wait_health(deadline, lambda: cancel is not None and cancel.is_set())
    except Timeout:
        check(cancel)
        raise Timeout(
            f"{vm.name} ({vm.address}): its job agent did not answer within {timeout:.0f} s",
            hint=f"last lines of its serial console ({vm.serial_log}):\n"
            f"{serial_tail(vm.serial_log)}",
        ) from None
    if health.get("locked") is not True or not health.get("code_root_hash"):
        raise GcvmError(f"{vm.name}: the agent answers but the guest says it is not locked",
                        hint="the guest is not what was launched; see the serial log")  # fmt: skip
    ifname, verified, evidence = agent_facts(health, vm.mac)
    if verified != str(vm.tee):
        raise GcvmError(
            f"{vm.name}: asked for TEE {vm.tee}, the guest reports {verified} ({evidence})",
            hint="the guest is not what was requested; see the serial log",
        )
    ui.log.info("%s: agent up after %.1f s (locked, code %s)", vm.name,
                time.monotonic() - start, health.get("code_root_hash"))  # fmt: skip
    return replace(vm, ifname=ifname, tee_verified=verified, tee_evidence=evidence)


def _vm_ready(
    run: _Up,
    st: ClusterState,
    vm: VmState,
    wheel: Path,
    deadline: float,
    cancel: threading.Event | None = None,
) -> VmState:
    backend = run.backend
    if vm.locked:
        return _locked_ready(vm, st, run.timeout, deadline, cancel)

    def left() -> float:
        check(cancel)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout("deadline passed")
        return remaining

    def connect() -> Guest:
        """SSH in slices, so that a cancel (another VM failed, Ctrl-C) is seen within one."""
        while True:
            budget = left()
            began = time.monotonic()
            try:
                return backend.connect(st, vm, min(CONNECT_SLICE_S, budget))
            except Timeout:
                spent = time.monotonic() - began
                if budget <= CONNECT_SLICE_S or spent < CONNECT_SLICE_S * 0.9:
                    raise

    start = time.monotonic()
    try:
        guest = connect()
    except (Timeout, RemoteError) as exc:
        raise Timeout(
            f"{vm.name} ({vm.address}) did not become reachable over SSH within "
            f"{run.timeout:.0f} s: {exc}",
            hint=f"last lines of its serial console ({vm.serial_log}):\n"
            f"{serial_tail(vm.serial_log)}",
        ) from None
    try:
        ui.log.info("%s: SSH up after %.1f s", vm.name, time.monotonic() - start)
        facts = guest.run(["sh", "-c", GUEST_FACTS], timeout=min(60.0, left())).stdout
        ifname, verified, evidence = parse_guest_facts(facts, vm.mac)
        if verified != str(vm.tee):
            raise GcvmError(
                f"{vm.name}: asked for TEE {vm.tee}, the guest reports {verified} ({evidence})",
                hint="the guest is not what was requested; see the serial log",
            )
        python = st.image.get("python", "python3")

        def systemd_up() -> None:
            res = guest.run(
                ["systemctl", "is-system-running", "--wait"], timeout=left(), check=False
            )
            # exit 0 is "running" (systemctl's contract), even when the channel's output was
            # lost (seen once under load, with the install running on the other channel)
            status = (res.stdout.strip().splitlines() or ["running" if res.rc == 0
                                                          else "?"])[-1]  # fmt: skip
            if status not in ("running", "degraded"):
                raise RemoteError(
                    f"{vm.name}: systemd reports {status!r} (wanted running or degraded)",
                    hint=f"`gcvm ssh {vm.name} systemctl --failed` shows why",
                )
            ui.log.info("%s: systemd %s after %.1f s", vm.name, status, time.monotonic() - start)

        def install() -> None:
            deploy.install(guest, wheel, python, timeout=min(300.0, left()))
            ui.log.info("%s: code installed after %.1f s", vm.name, time.monotonic() - start)

        # the end of the boot and the install overlap (one SSH connection, two channels)
        _parallel(lambda step: step(), [systemd_up, install], f"{vm.name}-ready")
        ui.log.info(
            "%s: ready after %.1f s, %s on %s", vm.name, time.monotonic() - start, verified, ifname
        )
        return replace(vm, ifname=ifname, tee_verified=verified, tee_evidence=evidence)
    finally:
        guest.close()
