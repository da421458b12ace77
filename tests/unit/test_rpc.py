"""Real torch-rpc worlds on loopback (the opt-in `--transport torch-rpc`): separate processes,
TCP only. Dead and hung workers, a dead master, two masters sharing one worker, and the
rendezvous settings. tests/unit/test_wire_world.py holds the same cases for the default wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from groupcover.errors import RendezvousError
from groupcover.rendezvous import Rendezvous
from groupcover.rpc import backend_options
from tests.unit.transports import free_port, worker_argv

pytestmark = pytest.mark.slow


def rpc_argv(rank: int, world_size: int, port: int, timeout_s: float) -> list[str]:
    return worker_argv(rank, world_size, port, timeout_s, transport="torch-rpc")


# A master driven by the test: joins, publishes one layer, then follows its script.
MASTER = r"""
import sys, time, torch
from groupcover import rpc
from groupcover.errors import WorkerUnavailable
from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp
port, rank, world, target, timeout, script = sys.argv[1:7]
rank, world, target, timeout = int(rank), int(world), int(target), float(timeout)
torch.set_num_threads(1)
rdv = Rendezvous(rank, world, "127.0.0.1", int(port), ifname="lo", force_tcp=True,
                     timeout_s=timeout)
rpc.join(rdv, "master")
transport = rpc.RpcTransport(target, owner=f"{rank}/test", timeout_s=timeout)
scale = float(rank + 1)
transport.publish("l0", scale * torch.eye(4), LayerOp("linear"))
if script == "wait":
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    try:
        transport.run("l0", torch.ones(2, 4))
    except WorkerUnavailable as exc:
        print(f"unavailable after {time.monotonic() - start:.1f}s: {exc}", flush=True)
        rpc.leave(graceful=False)
        sys.exit(3)
    sys.exit(0)
if script == "die":
    print("ready", flush=True)
    time.sleep(600)
if script == "finish":
    transport.close()
    print("ready", flush=True)
    try:
        rpc.finish(rdv)
    except WorkerUnavailable as exc:
        print(f"unavailable: {exc}", flush=True)
        sys.exit(3)
    sys.exit(0)
# "share": wait until every master's layer is on the worker, then check our own results
deadline = time.monotonic() + timeout
while len(transport.layers_on_worker()) < world - 1:
    assert time.monotonic() < deadline, "the other master never published"
    time.sleep(0.05)
x = torch.randn(3, 4)
for _ in range(20):
    torch.testing.assert_close(transport.run("l0", x), scale * x)
transport.close()
rpc.finish(rdv)
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


def _ready(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_master_fails_fast_when_worker_dies_or_hangs(fault: str) -> None:
    port, timeout = free_port(), 4.0
    worker = subprocess.Popen(rpc_argv(1, 2, port, timeout), env=_env())
    master = _master(port, 0, 2, 1, timeout, "wait")
    try:
        _ready(master)
        worker.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        out, _ = master.communicate("go\n", timeout=timeout + 20)
        assert master.returncode == 3, out
        assert "unavailable" in out and "worker1" in out
        assert time.monotonic() - start < timeout + 10
    finally:
        _stop(master, worker)


def test_worker_exits_when_its_master_dies() -> None:
    port, timeout = free_port(), 3.0
    worker = subprocess.Popen(rpc_argv(1, 2, port, timeout), env=_env(), stderr=subprocess.PIPE,
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
    worker = subprocess.Popen(rpc_argv(2, 3, port, timeout), env=_env(), stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    done = _master(port, 0, 3, 2, timeout, "finish")
    dying = _master(port, 1, 3, 2, timeout, "die")
    try:
        _ready(done)
        _ready(dying)
        dying.kill()
        out, _ = done.communicate(timeout=60)
        assert done.returncode == 3, out
        assert "unavailable: a peer rank went away" in out
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3 and "Traceback" not in err
    finally:
        _stop(done, dying, worker)


@pytest.mark.parametrize("role", ["master", "worker"])
def test_incomplete_world_fails_within_the_timeout(role: str) -> None:
    """Only one rank of two ever starts: it reports the missing world instead of waiting."""
    argv = rpc_argv(1, 2, free_port(), 2.0)
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
    worker = subprocess.Popen(rpc_argv(2, 3, port, timeout), env=_env())
    masters = [_master(port, rank, 3, 2, timeout, "share") for rank in (0, 1)]
    try:
        for master in masters:
            out, _ = master.communicate(timeout=90)
            assert master.returncode == 0
            assert "shared ok" in out
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(*masters, worker)


def test_rendezvous_from_the_seed_variables() -> None:
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501", "RANK": "2", "WORLD_SIZE": "3",
           "TP_SOCKET_IFNAME": "eth1"}  # fmt: skip
    rdv = Rendezvous.from_env(env, timeout_s=5.0)
    assert (rdv.rank, rdv.world_size, rdv.url, rdv.ifname) == (2, 3, "tcp://10.0.0.1:29501", "eth1")
    options = backend_options(Rendezvous(0, 2, force_tcp=True))
    assert options.init_method == "tcp://127.0.0.1:29500"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "x", "RANK": "0", "WORLD_SIZE": "2"}, "integer"),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "1", "RANK": "2", "WORLD_SIZE": "2"}, "outside"),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "1"}, "at least 2"),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "70000", "RANK": "0", "WORLD_SIZE": "2"}, "port"),
    ],
)
def test_rendezvous_rejects_bad_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(RendezvousError, match=message):
        Rendezvous.from_env(env)


def test_launched_master_reports_a_worker_killed_mid_benchmark() -> None:
    """Through the real entry point: the worker dies while the master is timing forwards."""
    port, timeout = free_port(), 5.0
    worker = subprocess.Popen(rpc_argv(1, 2, port, timeout), env=_env())
    argv = rpc_argv(0, 2, port, timeout)
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
        assert "groupcover: error: worker1 did not answer run" in rest, rest
        assert "Traceback" not in rest
    finally:
        _stop(master, worker)
