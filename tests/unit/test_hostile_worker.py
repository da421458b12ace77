"""The worker is the attacker. Against the real default transport, with the worker in its own
process (tests/unit/hostile_worker.py): whatever it sends, the master executes nothing of it,
allocates no more than the reply it expects, and fails within its deadline with one line that
names the worker. The same attacker first shows the hole in torch-rpc (why it is opt-in)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from groupcover.errors import WorkerError, WorkerLost, WorkerProtocolError
from groupcover.transport import LayerOp
from groupcover.wire import client
from groupcover.wire.client import TcpTransport
from tests.unit.transports import free_port, worker_argv

DEADLINE_S = 1.5
SLACK_S = 1.0  # process scheduling on a shared host

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "pwned"


@pytest.fixture(scope="module")
def hostile(marker: Path) -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.hostile_worker", str(marker)],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["port"], line
        yield ("127.0.0.1", int(line[1]))
        proc.stdin.close()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Allocations:
    """Counts the master's reply buffers (the only place they are allocated)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shapes: list[tuple[int, ...]] = []
        real = client.allocate

        def counted(dtype: int, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
            self.shapes.append(shape)
            return real(dtype, shape, order)

        monkeypatch.setattr(client, "allocate", counted)


def _session(address: tuple[str, int], behaviour: str) -> TcpTransport:
    transport = TcpTransport(address, "worker1", owner=behaviour, timeout_s=DEADLINE_S)
    transport.publish("l0", torch.randn(4, 3), LayerOp("linear"))
    return transport


# (behaviour, error class, words in the message, reply buffers the master may allocate)
HEADER_STAGE = [
    ("pickle-instead-of-reply", WorkerProtocolError, "malformed reply header: bad magic"),
    ("pickle-as-error-text", WorkerError, ""),
    ("bad-magic", WorkerProtocolError, "bad magic"),
    ("bad-version", WorkerProtocolError, "protocol version 99"),
    ("unknown-op", WorkerProtocolError, "unknown op"),
    ("wrong-op", WorkerProtocolError, "sent a WELCOME reply, expected RESULT"),
    ("wrong-dtype", WorkerProtocolError, "dtype code 2, expected 1"),
    ("wrong-shape", WorkerProtocolError, "shape (4, 2), expected (2, 4)"),
    ("wrong-order", WorkerProtocolError, "memory order"),
    ("too-many-dims", WorkerProtocolError, "7 dimensions"),
    ("length-short", WorkerProtocolError, "payload of 28 bytes"),
    ("length-long", WorkerProtocolError, "payload of 36 bytes"),
    ("length-2^62", WorkerProtocolError, f"payload of {1 << 62} bytes"),
    ("length-2^62-consistent", WorkerProtocolError, "expected (2, 4)"),
    ("error-2^62", WorkerProtocolError, "dimension out of range"),
    ("nan-value-field", WorkerProtocolError, "not a finite"),
    ("other-layer", WorkerProtocolError, "reply for layer"),
    ("other-request", WorkerProtocolError, "reply to request"),
    ("stall-in-header", WorkerLost, "stalled"),
    ("stall-silent", WorkerLost, "stalled"),
    ("drip", WorkerLost, "stalled"),
    ("close-in-header", WorkerLost, "closed the connection early"),
    ("close-before-reply", WorkerLost, "closed the connection early"),
    ("reset", WorkerLost, "closed the connection early"),
]
PAYLOAD_STAGE = [
    ("nan", WorkerProtocolError, "NaN or infinite"),
    ("inf", WorkerProtocolError, "NaN or infinite"),
    ("stall-in-payload", WorkerLost, "stalled"),
    ("close-in-payload", WorkerLost, "closed the connection early"),
]


@pytest.mark.parametrize(("behaviour", "cls", "words"), HEADER_STAGE + PAYLOAD_STAGE)
def test_hostile_reply_is_a_worker_fault(
    hostile: tuple[str, int],
    marker: Path,
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
    cls: type[WorkerError],
    words: str,
) -> None:
    transport = _session(hostile, behaviour)
    allocations = Allocations(monkeypatch)
    x = torch.randn(2, 3)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(cls) as caught:
            transport.run("l0", x)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(f"worker1 at {hostile[0]}:{hostile[1]}: "), message
    assert words in message
    assert "\n" not in message and "\x1b" not in message
    assert elapsed < DEADLINE_S + SLACK_S, f"{behaviour}: {elapsed:.2f} s"
    if "stall" in behaviour or behaviour == "drip":
        assert elapsed >= DEADLINE_S * 0.9  # it did wait for the deadline, not less
    assert peak < 256 * 1024, f"{behaviour}: Python allocations peaked at {peak} bytes"
    if (behaviour, cls, words) in HEADER_STAGE:
        assert allocations.shapes == []  # refused before any reply buffer existed
    else:
        assert allocations.shapes == [(2, 4)]  # exactly the expected reply, nothing more
    assert not marker.exists()
    if isinstance(caught.value, WorkerProtocolError | WorkerLost):
        # the session is broken for good: no half-state, the same error, immediately
        start = time.monotonic()
        with pytest.raises(cls):
            transport.run("l0", x)
        assert time.monotonic() - start < 0.5
        with pytest.raises(cls):
            transport.publish("l1", torch.randn(4, 3), LayerOp("linear"))
    transport.close()


def test_pickle_in_the_payload_is_only_numbers(hostile: tuple[str, int], marker: Path) -> None:
    """Pickle bytes where the floats go are read as floats (or refused): never unpickled."""
    transport = _session(hostile, "pickle-as-payload")
    try:
        y = transport.run("l0", torch.randn(2, 3))
        assert (y.shape, y.dtype) == ((2, 4), torch.float32)
    except WorkerProtocolError as exc:
        assert "NaN or infinite" in str(exc)
    assert not marker.exists()
    transport.close()


def test_an_unrequested_second_reply_breaks_the_session(hostile: tuple[str, int]) -> None:
    transport = _session(hostile, "two-replies")
    x = torch.randn(2, 3)
    transport.run("l0", x)
    with pytest.raises(WorkerProtocolError, match="reply to request"):
        transport.run("l0", x)


def test_a_reply_meant_for_another_master_is_refused(hostile: tuple[str, int]) -> None:
    """The worker replays one session's (valid) reply into another's: ids never match."""
    honest = _session(hostile, "record")
    x = torch.randn(2, 3)
    honest.run("l0", x)
    victim = _session(hostile, "replay-other-master")
    with pytest.raises(WorkerProtocolError, match="reply to request"):
        victim.run("l0", x)
    honest.close()


def test_a_2_62_length_is_refused_before_any_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """By design, without a network: the header check alone refuses it."""
    from groupcover.wire.schema import Header, Op, SchemaError

    good = Header(Op.RESULT, 7, 1, 1, (2, 4), (0, 1), 32).pack()
    crafted = bytearray(good)
    crafted[80:88] = (1 << 62).to_bytes(8, "little")
    with pytest.raises(SchemaError, match=str(1 << 62)):
        Header.unpack(crafted)


# ---- the same attacker against torch-rpc: the known hole ---------------------------------------

ATTACKER = r"""
import os, sys
from groupcover import rpc
from groupcover.rendezvous import Rendezvous
import torch.distributed.rpc as trpc
port, marker = sys.argv[1:3]
rdv = Rendezvous(1, 2, "127.0.0.1", int(port), ifname="lo", force_tcp=True, timeout_s=60)
rpc.join(rdv, "worker")
trpc.rpc_sync("worker0", os.system, (f"touch {marker}",))  # runs in the master
rpc.finish(rdv)
"""


@pytest.mark.slow
def test_known_hole_a_torch_rpc_worker_runs_code_in_the_master(tmp_path: Path) -> None:
    """Documents why torch-rpc is opt-in: its worker ran a shell command inside the master."""
    marker, port = tmp_path / "pwned", free_port()
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), str(marker)], env=ENV)
    argv = worker_argv(0, 2, port, 60.0, transport="torch-rpc")
    argv[argv.index("--role") + 1] = "master"
    argv += [
        "--worker",
        "1",
        "--model",
        "minilm",
        "--modes",
        "tee-only",
        "--batch",
        "1",
        "--seq",
        "8",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "r.json"),
    ]
    try:
        master = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=180)
        assert attacker.wait(timeout=60) == 0
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert master.returncode == 0, master.stderr
    assert marker.exists()  # the hole: the worker executed code in the master
    assert "WARNING: torch-rpc: the worker could execute code in the master" in master.stdout
    document = json.loads((tmp_path / "r.json").read_text())
    for facts in (document["settings"], *document["results"]):
        assert facts["transport"] == "torch-rpc"
        assert "the worker could execute code in the master" in facts["transport_warning"]


@pytest.mark.slow
def test_the_same_attacker_gets_nothing_from_the_default_transport(tmp_path: Path) -> None:
    """The same worker speaking the default wire can only send bytes: a pickle is refused."""
    marker = tmp_path / "pwned"
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.hostile_worker", str(marker)],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        address = ("127.0.0.1", int(proc.stdout.readline().split()[1]))
        for behaviour in ("pickle-instead-of-reply", "pickle-as-error-text", "pickle-as-payload"):
            transport = _session(address, behaviour)
            with contextlib.suppress(WorkerError):
                transport.run("l0", torch.randn(2, 3))
            transport.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not marker.exists()
