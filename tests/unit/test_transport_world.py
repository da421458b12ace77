"""Worlds on loopback over each transport (the default TCP wire and the opt-in torch-rpc), in
separate processes: dead and hung workers, a dead master, masters sharing one worker at each world
size, an incomplete world, a worker killed mid-benchmark; then what only the default wire
promises (a stopped master is gone past the deadline, idle ranks do not spin) and the rendezvous
settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groupcover.errors import RendezvousError
from groupcover.rendezvous import Rendezvous
from tests.unit.transports import free_port, worker_argv

pytestmark = pytest.mark.slow

KINDS = ["tcp", "torch-rpc"]

# A master driven by the test: joins over its transport, publishes one layer, then follows its
# script. It prints "ready" and the worker's address (tcp; "-" for torch-rpc, which hides it).
MASTER = r"""
import sys, time, torch
from groupcover.errors import WorkerError, WorkerUnavailable
from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp
kind, port, rank, size, target, timeout, script = sys.argv[1:8]
rank, size, target, timeout = int(rank), int(size), int(target), float(timeout)
torch.set_num_threads(1)
rdv = Rendezvous(rank, size, "127.0.0.1", int(port), ifname="lo", force_tcp=True,
                 timeout_s=timeout)
if kind == "tcp":
    from groupcover.wire import world
    membership = world.join(rdv, "master")
    transport = membership.connect(target, f"{rank}/test", timeout)
    where = transport.address[0]
    finish, give_up = membership.finish, lambda: membership.finish(ok=False)
    sessions = transport.worker_sessions
else:
    from groupcover import rpc
    rpc.join(rdv, "master")
    transport = rpc.RpcTransport(target, owner=f"{rank}/test", timeout_s=timeout)
    where = "-"
    finish, give_up = (lambda: rpc.finish(rdv)), (lambda: rpc.leave(graceful=False))
    sessions = lambda: len(transport.layers_on_worker())
scale = float(rank + 1)
transport.publish("l0", scale * torch.eye(4), LayerOp("linear"))
if script == "wait":
    print("ready", where, flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    try:
        transport.run("l0", torch.ones(2, 4))
    except (WorkerError, WorkerUnavailable) as exc:
        print(f"unavailable after {time.monotonic() - start:.1f}s: {exc}", flush=True)
        try:
            give_up()
        except WorkerUnavailable:
            pass
        sys.exit(3)
    sys.exit(0)
if script == "die":
    print("ready", where, flush=True)
    time.sleep(600)
if script == "finish":
    transport.close()
    print("ready", where, flush=True)
    try:
        finish()
    except WorkerUnavailable as exc:
        print(f"unavailable: {exc}", flush=True)
        sys.exit(3)
    sys.exit(0)
# "share": wait until every master's layer is on the worker, then check our own results
deadline = time.monotonic() + timeout
while sessions() < size - 1:
    assert time.monotonic() < deadline, "the other master never published"
    time.sleep(0.05)
x = torch.randn(3, 4)
for _ in range(20):
    torch.testing.assert_close(transport.run("l0", x), scale * x)
transport.close()
finish()
print("shared ok", flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker(kind: str, rank: int, world: int, port: int, timeout: float, **popen):
    return subprocess.Popen(worker_argv(rank, world, port, timeout, transport=kind), env=_env(),
                            **popen)  # fmt: skip


def _master(kind: str, port: int, rank: int, world: int, target: int, timeout: float,
            script: str) -> subprocess.Popen:  # fmt: skip
    argv = [sys.executable, "-c", MASTER, kind, str(port), str(rank), str(world), str(target),
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


# ---- every transport -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_master_fails_fast_when_worker_dies_or_hangs(kind: str, fault: str) -> None:
    port, timeout = free_port(), 4.0
    worker = _worker(kind, 1, 2, port, timeout)
    master = _master(kind, port, 0, 2, 1, timeout, "wait")
    try:
        words = _ready(master)
        worker.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        out, _ = master.communicate("go\n", timeout=timeout + 20)
        assert master.returncode == 3, out
        assert "unavailable after" in out and "worker1" in out
        if kind == "tcp":  # the wire names the worker's address and says what went wrong
            assert words[1] == "127.0.0.1"  # the address of the interface named by --ifname lo
            assert "worker1 at 127.0.0.1:" in out
            assert ("stalled" if fault == "hang" else "closed the connection early") in out
            assert float(out.split("after ")[1].split("s:")[0]) <= timeout + 1
            assert time.monotonic() - start < 2 * timeout + 10  # and the store let it go too
        else:
            assert time.monotonic() - start < timeout + 10
    finally:
        _stop(master, worker)


# the wire's world must assemble first, on a loaded host too
DEATH_TIMEOUT_S = {"tcp": 10.0, "torch-rpc": 3.0}


@pytest.mark.parametrize("kind", KINDS)
def test_worker_exits_when_its_master_dies(kind: str) -> None:
    port, timeout = free_port(), DEATH_TIMEOUT_S[kind]
    worker = _worker(kind, 1, 2, port, timeout, stderr=subprocess.PIPE, text=True)
    master = _master(kind, port, 0, 2, 1, timeout, "die")
    try:
        _ready(master)
        master.kill()
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3
        assert "groupcover: error: a peer rank went away" in err
        assert "Traceback" not in err
    finally:
        _stop(master, worker)


@pytest.mark.parametrize("kind", KINDS)
def test_finished_master_exits_when_another_master_dies(kind: str) -> None:
    """World of 3: master 0 is done and waits for the others; master 1 dies before finishing."""
    port, timeout = free_port(), 3.0
    worker = _worker(kind, 2, 3, port, timeout, stderr=subprocess.PIPE, text=True)
    done = _master(kind, port, 0, 3, 2, timeout, "finish")
    dying = _master(kind, port, 1, 3, 2, timeout, "die")
    try:
        _ready(done)
        _ready(dying)
        dying.kill()
        out, _ = done.communicate(timeout=60)
        assert done.returncode == 3, out
        assert "unavailable: a peer rank went away before the whole world had finished" in out
        if kind == "tcp":
            assert "(rank 1: its connection closed)" in out
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3 and "Traceback" not in err
    finally:
        _stop(done, dying, worker)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ["master", "worker"])
def test_incomplete_world_fails_within_the_timeout(kind: str, role: str) -> None:
    """Only one rank of two ever starts: it reports the missing world instead of waiting."""
    argv = worker_argv(1, 2, free_port(), 2.0, transport=kind)
    if role == "master":
        argv[argv.index("--role") + 1 : argv.index("--rank") + 2] = ["master", "--rank", "0"]
        argv += ["--worker", "1", "--model", "minilm", "--batch", "1", "--seq", "8"]
    start = time.monotonic()
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "did not assemble within 2 s" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_masters_share_one_worker(kind: str, world: int) -> None:
    """Every rank but the last is a master; all publish the same layer id with different
    weights to the last rank, the one worker, and each gets its own results."""
    port, timeout = free_port(), 30.0
    worker = _worker(kind, world - 1, world, port, timeout)
    masters = [_master(kind, port, rank, world, world - 1, timeout, "share")
               for rank in range(world - 1)]  # fmt: skip
    try:
        for master in masters:
            out, _ = master.communicate(timeout=90)
            assert master.returncode == 0
            assert "shared ok" in out
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(*masters, worker)


@pytest.mark.parametrize("kind", KINDS)
def test_launched_master_reports_a_worker_killed_mid_benchmark(kind: str) -> None:
    """Through the real entry point: the worker dies while the master is timing forwards."""
    port, timeout = free_port(), 5.0
    worker = _worker(kind, 1, 2, port, timeout)
    argv = worker_argv(0, 2, port, timeout, transport=kind)
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
        assert "Traceback" not in rest
        if kind == "tcp":
            assert "groupcover: error: worker1 at 127.0.0.1:" in rest, rest
            errors = [line for line in rest.splitlines() if "error:" in line]
            assert len(errors) == 1, rest
        else:
            assert "groupcover: error: worker1 did not answer run" in rest, rest
    finally:
        _stop(master, worker)


# ---- the default wire only -------------------------------------------------------------------


def test_a_stopped_master_is_gone_past_the_deadline() -> None:
    """A master that stops (SIGSTOP) keeps its connection open: its silence ends it."""
    port, timeout = free_port(), 2.0
    worker = _worker("tcp", 1, 2, port, timeout, stderr=subprocess.PIPE, text=True)
    master = _master("tcp", port, 0, 2, 1, timeout, "die")
    try:
        _ready(master)
        master.send_signal(signal.SIGSTOP)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 3 and "a peer rank went away" in err
    finally:
        _stop(master, worker)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_ranks_do_not_spin() -> None:
    """A worker serving an idle master, and the master itself, use no CPU while they wait."""
    port, timeout = free_port(), 30.0
    worker = _worker("tcp", 1, 2, port, timeout)
    master = _master("tcp", port, 0, 2, 1, timeout, "die")  # publishes, then sleeps
    try:
        _ready(master)
        time.sleep(0.5)
        before = {proc.pid: _cpu_s(proc.pid) for proc in (worker, master)}
        time.sleep(3.0)
        used = {pid: _cpu_s(pid) - cpu for pid, cpu in before.items()}
        assert all(seconds < 0.15 for seconds in used.values()), used
    finally:
        _stop(master, worker)


# ---- the rendezvous settings -----------------------------------------------------------------


def test_rendezvous_from_the_seed_variables() -> None:
    from groupcover.rpc import backend_options

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


def test_a_dead_peers_barrier_is_one_line_not_torchs_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch logs a failed shutdown barrier with a traceback; the rank reports it in one line."""
    import logging

    from groupcover import rpc as gc_rpc
    from groupcover.errors import WorkerUnavailable
    from groupcover.rendezvous import Rendezvous

    def failing_barrier(graceful: bool = True) -> None:
        try:
            raise RuntimeError("peer gone")
        except RuntimeError:
            logging.getLogger("torch.distributed.rpc.api").exception("Failed to respond")
            raise

    monkeypatch.setattr(gc_rpc, "leave", failing_barrier)
    rendezvous = Rendezvous(rank=1, world_size=2, master_addr="127.0.0.1", master_port=1)
    monkeypatch.setattr(gc_rpc, "_peers_alive", lambda *_a: True)
    with caplog.at_level(logging.DEBUG), pytest.raises(WorkerUnavailable, match="peer gone"):
        gc_rpc.finish(rendezvous)
    assert not [r for r in caplog.records if r.name == "torch.distributed.rpc.api"]
