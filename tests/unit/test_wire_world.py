"""Worlds over the default wire on loopback, in separate processes: the cases test_rpc.py holds
for torch-rpc (dead and hung workers, a dead master, two masters sharing one worker, an
incomplete world, a worker killed mid-benchmark), plus the announced address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.transports import free_port, worker_argv

pytestmark = pytest.mark.slow

# A master driven by the test: joins, publishes one layer, then follows its script.
MASTER = r"""
import sys, time, torch
from groupcover.errors import WorkerError, WorkerUnavailable
from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp
from groupcover.wire import world
port, rank, size, target, timeout, script = sys.argv[1:7]
rank, size, target, timeout = int(rank), int(size), int(target), float(timeout)
torch.set_num_threads(1)
rdv = Rendezvous(rank, size, "127.0.0.1", int(port), ifname="lo", timeout_s=timeout)
membership = world.join(rdv, "master")
transport = membership.connect(target, f"{rank}/test", timeout)
scale = float(rank + 1)
transport.publish("l0", scale * torch.eye(4), LayerOp("linear"))
if script == "wait":
    print("ready", transport.address[0], flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    try:
        transport.run("l0", torch.ones(2, 4))
    except WorkerError as exc:
        print(f"unavailable after {time.monotonic() - start:.1f}s: {exc}", flush=True)
        try:
            membership.finish(ok=False)
        except WorkerUnavailable:
            pass
        sys.exit(3)
    sys.exit(0)
if script == "die":
    print("ready", flush=True)
    time.sleep(600)
if script == "finish":
    transport.close()
    print("ready", flush=True)
    try:
        membership.finish()
    except WorkerUnavailable as exc:
        print(f"unavailable: {exc}", flush=True)
        sys.exit(3)
    sys.exit(0)
# "share": wait until every master's layer is on the worker, then check our own results
deadline = time.monotonic() + timeout
while transport.worker_sessions() < size - 1:
    assert time.monotonic() < deadline, "the other master never published"
    time.sleep(0.05)
x = torch.randn(3, 4)
for _ in range(20):
    torch.testing.assert_close(transport.run("l0", x), scale * x)
transport.close()
membership.finish()
print("shared ok", flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _master(port: int, rank: int, world: int, target: int, timeout: float, script: str):
    argv = [sys.executable, "-c", MASTER, str(port), str(rank), str(world), str(target),
            str(timeout), script]  # fmt: skip
    return subprocess.Popen(
        argv, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def _ready(proc: subprocess.Popen) -> list[str]:
    assert proc.stdout is not None
    words = proc.stdout.readline().split()
    assert words[:1] == ["ready"], words
    return words


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_master_fails_fast_when_worker_dies_or_hangs(fault: str) -> None:
    port, timeout = free_port(), 4.0
    worker = subprocess.Popen(worker_argv(1, 2, port, timeout), env=_env())
    master = _master(port, 0, 2, 1, timeout, "wait")
    try:
        words = _ready(master)
        assert words[1] == "127.0.0.1"  # the address of the interface named by --ifname lo
        worker.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        out, _ = master.communicate("go\n", timeout=timeout + 20)
        assert master.returncode == 3, out
        assert "unavailable after" in out and "worker1 at 127.0.0.1:" in out
        assert ("stalled" if fault == "hang" else "closed the connection early") in out
        assert float(out.split("after ")[1].split("s:")[0]) <= timeout + 1
        assert time.monotonic() - start < 2 * timeout + 10  # and the store let it go too
    finally:
        _stop(master, worker)


def test_worker_exits_when_its_master_dies() -> None:
    port, timeout = free_port(), 10.0  # the world must assemble first, on a loaded host too
    worker = subprocess.Popen(worker_argv(1, 2, port, timeout), env=_env(), stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    master = _master(port, 0, 2, 1, timeout, "die")
    try:
        _ready(master)
        master.kill()
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3
        assert "groupcover: error: a peer rank went away" in err
        assert "Traceback" not in err
    finally:
        _stop(master, worker)


def test_finished_master_exits_when_another_master_dies() -> None:
    """World of 3: master 0 is done and waits for the others; master 1 dies before finishing."""
    port, timeout = free_port(), 3.0
    worker = subprocess.Popen(worker_argv(2, 3, port, timeout), env=_env(), stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    done = _master(port, 0, 3, 2, timeout, "finish")
    dying = _master(port, 1, 3, 2, timeout, "die")
    try:
        _ready(done)
        _ready(dying)
        dying.kill()
        out, _ = done.communicate(timeout=60)
        assert done.returncode == 3, out
        assert (
            "a peer rank went away before the whole world had finished (rank 1: its "
            "connection closed)" in out
        )
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3 and "Traceback" not in err
    finally:
        _stop(done, dying, worker)


def test_a_stopped_master_is_gone_past_the_deadline() -> None:
    """A master that stops (SIGSTOP) keeps its connection open: its silence ends it."""
    port, timeout = free_port(), 2.0
    worker = subprocess.Popen(worker_argv(1, 2, port, timeout), env=_env(), stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    master = _master(port, 0, 2, 1, timeout, "die")
    try:
        _ready(master)
        master.send_signal(signal.SIGSTOP)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3 and "a peer rank went away" in err
    finally:
        _stop(master, worker)


@pytest.mark.parametrize("role", ["master", "worker"])
def test_incomplete_world_fails_within_the_timeout(role: str) -> None:
    """Only one rank of two ever starts: it reports the missing world instead of waiting."""
    argv = worker_argv(1, 2, free_port(), 2.0)
    if role == "master":
        argv[argv.index("--role") + 1 : argv.index("--rank") + 2] = ["master", "--rank", "0"]
        argv += ["--worker", "1", "--model", "minilm", "--batch", "1", "--seq", "8"]
    start = time.monotonic()
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "did not assemble within 2 s" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30


def test_two_masters_share_one_worker() -> None:
    """World of 3: masters 0 and 1 publish the same layer id with different weights."""
    port, timeout = free_port(), 30.0
    worker = subprocess.Popen(worker_argv(2, 3, port, timeout), env=_env())
    masters = [_master(port, rank, 3, 2, timeout, "share") for rank in (0, 1)]
    try:
        for master in masters:
            out, _ = master.communicate(timeout=90)
            assert master.returncode == 0
            assert "shared ok" in out
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(*masters, worker)


def test_launched_master_reports_a_worker_killed_mid_benchmark() -> None:
    """Through the real entry point: the worker dies while the master is timing forwards."""
    port, timeout = free_port(), 5.0
    worker = subprocess.Popen(worker_argv(1, 2, port, timeout), env=_env())
    argv = worker_argv(0, 2, port, timeout)
    argv[argv.index("--role") + 1] = "master"
    argv += ["--worker", "1", "--model", "minilm", "--modes", "plain-offload", "--batch", "1",
             "--seq", "8", "--repeat", "100000", "--json", os.devnull]  # fmt: skip
    master = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert master.stderr is not None
        lines = iter(master.stderr.readline, "")
        assert any("timing 1 mode(s)" in line for line in lines)
        time.sleep(0.5)
        worker.kill()
        start = time.monotonic()
        rest = master.stderr.read()
        assert master.wait(timeout=timeout + 30) == 3
        assert time.monotonic() - start < timeout + 10
        assert "groupcover: error: worker1 at 127.0.0.1:" in rest, rest
        assert "Traceback" not in rest
        errors = [line for line in rest.splitlines() if "error:" in line]
        assert len(errors) == 1, rest
    finally:
        _stop(master, worker)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_ranks_do_not_spin() -> None:
    """A worker serving an idle master, and the master itself, use no CPU while they wait."""
    port, timeout = free_port(), 30.0
    worker = subprocess.Popen(worker_argv(1, 2, port, timeout), env=_env())
    master = _master(port, 0, 2, 1, timeout, "die")  # publishes, then sleeps
    try:
        _ready(master)
        time.sleep(0.5)
        before = {proc.pid: _cpu_s(proc.pid) for proc in (worker, master)}
        time.sleep(3.0)
        used = {pid: _cpu_s(pid) - cpu for pid, cpu in before.items()}
        assert all(seconds < 0.15 for seconds in used.values()), used
    finally:
        _stop(master, worker)
