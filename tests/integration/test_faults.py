"""Fault injection for real: signals sent to a running `gcvm up` at its phases, the private
libvirtd killed, a guest that never boots, a rank that exits at start, two `up`s at once. After
each, `gcvm down` (or nothing) must leave nothing on the host (`host_leftovers`).

Sized for TCG on 2 cores: most faults strike before a guest has booted (a QEMU costs little until
its kernel runs); one test boots a cluster once and injects three faults into it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import state
from tests.integration.conftest import (
    Env,
    Running,
    assert_nothing_left,
    cluster_name,
    host_leftovers,
)

pytestmark = pytest.mark.vm

PHASE_DAEMONS = "start a private libvirt in network namespace"
PHASE_BOOT = "define and start"
PHASE_CLEANUP = "clean up the failed cluster"


def _up(env: Env, name: str, *extra: str) -> Running:
    return Running(env, "up", "--tee", "none", "--workers", "1", "--name", name, *extra)


def _down_leaves_nothing(env: Env, name: str) -> None:
    down = env.gcvm("down", "--name", name, timeout=180)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)


def _state_json(env: Env, name: str) -> dict[str, Any]:
    path = env.home / "state" / "clusters" / name / "state.json"
    deadline = time.monotonic() + 60
    while True:
        try:
            data = json.loads(path.read_text())
            if data.get("private_daemon"):
                return dict(data)
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no daemon recorded in {path}")
        time.sleep(0.2)


# --- SIGINT at the phases of `up`, and a second one during its cleanup -------------------------


@pytest.mark.parametrize("phase", [PHASE_DAEMONS, PHASE_BOOT])
def test_sigint_during_up_removes_everything(gcvm_env: Env, phase: str) -> None:
    name = cluster_name()
    up = _up(gcvm_env, name)
    try:
        up.wait_for(phase)
        time.sleep(1.0)  # inside the step, not at its first line
        up.signal(signal.SIGINT)
        rc = up.finish()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc == 130, up.text
    assert "interrupted; the cluster was removed" in up.text and "Traceback" not in up.text
    assert host_leftovers(name) == []  # nothing left even before `gcvm down`
    _down_leaves_nothing(gcvm_env, name)


def test_second_sigint_during_cleanup_does_not_cut_it_short(gcvm_env: Env) -> None:
    name = cluster_name()
    up = _up(gcvm_env, name)
    try:
        up.wait_for(PHASE_BOOT)
        time.sleep(1.0)
        up.signal(signal.SIGINT)
        up.wait_for(PHASE_CLEANUP, timeout=120)
        up.signal(signal.SIGINT)  # the impatient second Ctrl-C
        rc = up.finish()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc == 130, up.text
    assert "cleaning up; wait for it to finish" in up.text, up.text
    assert "Traceback" not in up.text
    assert_nothing_left(name)


# --- the private libvirtd killed during `up` ---------------------------------------------------


def test_sigkill_of_the_daemon_during_up(gcvm_env: Env) -> None:
    name = cluster_name()
    up = _up(gcvm_env, name)
    try:
        pid = int(_state_json(gcvm_env, name)["private_daemon"]["libvirtd_pid"])
        up.wait_for(PHASE_BOOT)
        os.kill(pid, signal.SIGKILL)
        rc = up.finish()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc != 0 and "Traceback" not in up.text, up.text
    _down_leaves_nothing(gcvm_env, name)


# --- a guest that never boots ------------------------------------------------------------------


def test_a_guest_that_never_boots(gcvm_env: Env) -> None:
    """A raw disk with a partition table and nothing to boot: SeaBIOS finds no boot sector."""
    disk = gcvm_env.home / "blank.raw"
    data = bytearray(8 << 20)
    data[510:512] = b"\x55\xaa"
    disk.write_bytes(bytes(data))
    os.chmod(disk, 0o644)
    name = cluster_name()
    started = time.monotonic()
    up = gcvm_env.gcvm(
        "up", "--tee", "none", "--workers", "1", "--name", name,
        "--image", str(disk), "--timeout", "25", timeout=300,
    )  # fmt: skip
    print(f"up with a guest that never boots: {time.monotonic() - started:.0f} s")
    assert up.returncode == 1, up.stderr
    said = " ".join(up.stderr.split())
    assert "did not become reachable over SSH within 25 s" in said and "Traceback" not in said
    assert host_leftovers(name) == []
    _down_leaves_nothing(gcvm_env, name)


# --- two `up`s at once -------------------------------------------------------------------------


def test_two_ups_of_one_name_at_once(gcvm_env: Env) -> None:
    name = cluster_name()
    first, second = _up(gcvm_env, name), _up(gcvm_env, name)
    try:
        # exactly one goes on; the other is refused (the name is taken, or its lock is busy)
        refused = None
        deadline = time.monotonic() + 120
        while refused is None and time.monotonic() < deadline:
            for run in (first, second):
                if run.proc.poll() is not None:
                    refused = run
            time.sleep(0.2)
        assert refused is not None, (first.text, second.text)
        going = second if refused is first else first
        assert refused.finish() in (1, 2), refused.text  # 2: name taken; 1: its lock is busy
        assert re.search(r"already exists|is busy", refused.text), refused.text
        going.wait_for(PHASE_DAEMONS)
        time.sleep(1.0)
        going.signal(signal.SIGINT)
        assert going.finish() == 130, going.text
    finally:
        for run in (first, second):
            if run.proc.poll() is None:
                run.proc.kill()
    _down_leaves_nothing(gcvm_env, name)


def test_two_ups_of_different_names_at_once(gcvm_env: Env) -> None:
    names = [cluster_name(), cluster_name()]
    runs = [_up(gcvm_env, n) for n in names]
    try:
        for run in runs:
            run.wait_for(PHASE_BOOT)
        subnets = {_state_json(gcvm_env, n)["spec"]["subnet"] for n in names}
        assert len(subnets) == 2  # a subnet each
        for run in runs:
            run.signal(signal.SIGINT)
        assert [run.finish() for run in runs] == [130, 130], [r.text for r in runs]
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
    for n in names:
        _down_leaves_nothing(gcvm_env, n)


# --- one booted cluster: SIGINT during the code install, a rank that exits at start, the daemon
#     killed during `run bench` --------------------------------------------------------------


def _debug_log(env: Env, name: str) -> Path:
    return env.home / "state" / "clusters" / name / "debug.log"


def test_sigint_during_code_install(gcvm_env: Env) -> None:
    name = cluster_name()
    up = _up(gcvm_env, name)
    try:
        deadline = time.monotonic() + 400
        log = _debug_log(gcvm_env, name)
        while "SSH up after" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and up.proc.poll() is None, up.text
            time.sleep(0.5)
        time.sleep(1.0)  # the wheel is on its way in
        up.signal(signal.SIGINT)
        rc = up.finish()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert rc == 130, up.text
    assert_nothing_left(name)


@pytest.mark.slow
def test_faults_in_a_running_cluster(gcvm_env: Env) -> None:
    name = cluster_name()
    up = gcvm_env.gcvm("up", "--tee", "none", "--workers", "1", "--name", name, timeout=600)
    try:
        assert up.returncode == 0, up.stderr
        # a rank that exits at start: named, and the other rank stopped in its guest
        script = 'if [ "$GCVM_ROLE" = master ]; then exit 3; fi; exec sleep 300'
        ran = gcvm_env.gcvm("run", "exec", "--name", name, "--", "sh", "-c", script, timeout=120)
        said = " ".join(ran.stderr.split())
        assert ran.returncode == 1 and "exited with status 3" in said, ran.stderr
        time.sleep(2)
        left = gcvm_env.gcvm("ssh", "worker0", "--name", name, "--", "pgrep", "-f", "[s]leep 300")
        assert left.returncode == 1, f"the worker's rank still runs: {left.stdout}"

        # the private libvirtd killed while `run bench` runs, then Ctrl-C: the ranks it started
        # are stopped in the guests, and `down` still removes everything
        pid = int(state.load(name).private_daemon["libvirtd_pid"])  # type: ignore[index]
        bench = Running(
            gcvm_env, "run", "bench", "--name", name, "--model", "minilm",
            "--modes", "plain-offload", "--batch", "1", "--seq", "8", "--repeat", "1",
            "--timeout", "300", "--out", str(gcvm_env.home / "results"),
        )  # fmt: skip
        try:
            bench.wait_for(r"master0: \S+ -m groupcover launch")  # every rank started
            os.kill(pid, signal.SIGKILL)
            time.sleep(5)
            bench.signal(signal.SIGINT)
            rc = bench.finish(timeout=120)
        finally:
            if bench.proc.poll() is None:
                bench.proc.kill()
        assert rc == 130 and "Traceback" not in bench.text, bench.text
        time.sleep(2)
        for vm in ("master0", "worker0"):
            ranks = gcvm_env.gcvm(
                "ssh", vm, "--name", name, "--", "pgrep", "-f", "[g]roupcover launch"
            )
            assert ranks.returncode == 1, f"{vm} still runs a rank: {ranks.stdout}"
    finally:
        down = gcvm_env.gcvm("down", "--name", name, timeout=180)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)
