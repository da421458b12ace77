"""Red team against the default wire (groupcover/wire), part two: hostile masters sharing a
worker, descriptor exhaustion, and hostile peers on the rendezvous, each a real peer in its own
thread or process over loopback, against the real worker server and store. Part one,
test_redteam_wire.py, is the hostile worker against the master.

Each test asserts the behaviour the channel claims. The attacks that broke a claim say so in
their docstring ("Broke ..."): they were committed as strict xfails, then fixed in
groupcover/wire, and stay as regression tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from groupcover.errors import (
    GroupCoverError,
    RendezvousError,
    WorkerError,
    WorkerUnavailable,
)
from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp
from groupcover.wire import schema, store, world
from groupcover.wire.client import TcpTransport
from groupcover.wire.schema import HEADER, ErrorCode, Header, Op
from groupcover.wire.server import Limits, WorkerServer
from groupcover.wire.store import StoreClient, StoreError, StoreServer
from groupcover.worker import WorkerState
from tests.unit.hostile_worker import raw, recv_exact
from tests.unit.transports import free_port

LOOP = "127.0.0.1"
DEADLINE_S = 0.6
SLACK_S = 1.0  # scheduling on a shared 2-core host
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- 7. masters sharing one worker: namespaces and the worker's own bounds ---------------------


@pytest.fixture
def worker_server() -> Iterator[Callable[[Limits], WorkerServer]]:
    made: list[WorkerServer] = []

    def start(limits: Limits) -> WorkerServer:
        made.append(WorkerServer(LOOP, 0, WorkerState(torch.device("cpu")), limits).start())
        return made[-1]

    yield start
    for server in made:
        server.stop()


class RawMaster:
    """A hostile master speaking the schema by hand."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.request = 1000
        self.send(Header(Op.HELLO, self.next(), shape=(4,), order=(0,), nbytes=4), b"evil")
        assert self.reply()[0].op == Op.WELCOME

    def next(self) -> int:
        self.request += 1
        return self.request

    def send(self, header: Header, *parts: bytes) -> None:
        self.sock.sendall(raw(header) + b"".join(parts))

    def tensor(self, op: Op, layer: int, x: torch.Tensor, block: bytes = b"") -> None:
        order = tuple(range(x.dim()))
        header = Header(op, self.next(), layer, schema.dtype_code(x.dtype), tuple(x.shape), order,
                        x.numel() * x.element_size())  # fmt: skip
        self.send(header, block, bytes(schema.byte_view(x.contiguous(), order)))

    def reply(self) -> tuple[Header, bytes]:
        header = Header.unpack(recv_exact(self.sock, HEADER.size))
        return header, recv_exact(self.sock, header.nbytes)

    def close(self) -> None:
        self.sock.close()


def test_a_master_cannot_run_overwrite_or_release_another_masters_layer(
    worker_server: Callable[[Limits], WorkerServer],
) -> None:
    server = worker_server(Limits(timeout_s=5))
    honest = TcpTransport(server.address, "worker1", owner="honest", timeout_s=5)
    honest.publish("l0", torch.eye(4), LayerOp("linear"))
    number = honest._layers["l0"].number
    evil = RawMaster(server.address)
    try:
        for layer in (number, number - 1, number + 1, 0, (1 << 32) - 1):
            evil.tensor(Op.RUN, layer, torch.ones(1, 4))
            header, text = evil.reply()
            assert header.op == Op.ERROR and header.flags == ErrorCode.UNKNOWN_LAYER, text
        # its own layer under the same number lives in its own namespace
        evil.tensor(Op.PUBLISH, number, torch.zeros(4, 4), schema.pack_op(LayerOp("linear")))
        assert evil.reply()[0].op == Op.OK
        evil.tensor(Op.RUN, number, torch.ones(1, 4))
        header, data = evil.reply()
        assert header.op == Op.RESULT and data == bytes(16)
        evil.send(Header(Op.RELEASE, evil.next()))
        header, _ = evil.reply()
        assert header.op == Op.OK and header.value == 1.0  # its own one layer, nothing else
    finally:
        evil.close()
    x = torch.randn(3, 4)
    assert torch.equal(honest.run("l0", x), x)
    honest.close()


@pytest.mark.parametrize("shape", ["conv-padding", "linear-wide"])
def test_a_tiny_request_cannot_make_the_worker_build_a_huge_result(
    worker_server: Callable[[Limits], WorkerServer], shape: str
) -> None:
    """A 4-byte weight and a 4-byte input whose output is 16 MiB (conv2d padding 1024), or a
    16 KiB weight and input with a 16 MiB output: the worker's per-tensor bound must cover the
    tensor it computes, not only the ones it receives (with padding 65536 it would be 68 GB).

    Broke (fixed in groupcover/wire): the worker bounds received tensors (max_tensor_bytes)
    but not the output it computes: a 4-byte conv2d weight and input with padding 1024 make
    it build and send a 16 MiB result.
    """
    server = worker_server(Limits(max_tensor_bytes=1 << 20, timeout_s=5))
    transport = TcpTransport(server.address, "worker1", timeout_s=5)
    if shape == "conv-padding":
        transport.publish("l0", torch.ones(1, 1, 1, 1), LayerOp("conv2d", padding=(1024,)))
        x = torch.ones(1, 1, 1, 1)
    else:
        transport.publish("l0", torch.ones(4096, 1), LayerOp("linear"))
        x = torch.ones(1024, 1)
    with pytest.raises(WorkerError, match="limit"):
        transport.run("l0", x)
    transport.close()


def _is_closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1 << 16) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_request_header_begun_must_finish_within_the_deadline(
    worker_server: Callable[[Limits], WorkerServer],
) -> None:
    """DESIGN: "a message once begun must finish within the deadline": a slowloris master that
    sends one byte of a header and stops must not hold a session thread for ever.

    Broke (fixed in groupcover/wire): _Session.serve reads every request header with no
    deadline: one byte of a header holds the session thread for ever.
    """
    server = worker_server(Limits(timeout_s=DEADLINE_S))
    evil = RawMaster(server.address)
    evil.sock.sendall(b"G")
    try:
        assert _is_closed_by_peer(evil.sock, DEADLINE_S + SLACK_S + 1)
    finally:
        evil.close()


def test_a_request_body_dripped_past_the_deadline_ends_the_session(
    worker_server: Callable[[Limits], WorkerServer],
) -> None:
    """The worker's side of the drip: a PUBLISH whose weight arrives a byte at a time, each in
    time for a per-read timeout, is cut at the deadline, and nothing of it is published."""
    server = worker_server(Limits(timeout_s=DEADLINE_S))
    evil = RawMaster(server.address)
    weight = torch.zeros(16, 16)
    header = Header(Op.PUBLISH, evil.next(), 7, 1, (16, 16), (0, 1), 1024)
    evil.sock.sendall(raw(header) + schema.pack_op(LayerOp("linear")))
    start = time.monotonic()
    try:
        for byte in bytes(schema.byte_view(weight, (0, 1))):
            try:
                evil.sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.01)
            if time.monotonic() - start > DEADLINE_S + SLACK_S:
                break
        assert _is_closed_by_peer(evil.sock, SLACK_S)
        assert time.monotonic() - start < DEADLINE_S + 2 * SLACK_S
    finally:
        evil.close()
    assert server.state.owners() == {}


def test_a_connection_that_never_says_hello_is_dropped(
    worker_server: Callable[[Limits], WorkerServer],
) -> None:
    """Broke (fixed in groupcover/wire): no deadline before HELLO either: an idle connection
    holds a thread and a descriptor for ever.
    """
    server = worker_server(Limits(timeout_s=DEADLINE_S))
    idle = socket.create_connection(server.address, timeout=5)
    try:
        assert _is_closed_by_peer(idle, DEADLINE_S + SLACK_S + 1)
    finally:
        idle.close()


def test_connect_and_close_in_a_loop_leaves_no_trace_on_the_worker(
    worker_server: Callable[[Limits], WorkerServer],
) -> None:
    """Broke (fixed in groupcover/wire): WorkerServer kept every session's Thread object in
    _threads for its whole life: a peer that connects and closes in a loop grew the worker's
    memory without bound."""
    server = worker_server(Limits(timeout_s=DEADLINE_S))
    for _ in range(100):
        socket.create_connection(server.address, timeout=5).close()
    deadline = time.monotonic() + 5
    while server._sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server._sessions
    assert len(server._threads) <= 1, f"{len(server._threads)} session records kept"


FUZZ_WORKER = r"""
import sys, torch
from groupcover.wire.server import Limits, WorkerServer
from groupcover.worker import WorkerState
torch.set_num_threads(1)
limits = Limits(max_tensor_bytes=1 << 20, max_session_bytes=4 << 20, timeout_s=2)
server = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")), limits).start()
print("port", server.address[1], flush=True)
sys.stdin.read()
"""


def _fuzz_session(address: tuple[str, int], rng: random.Random) -> None:
    """One hostile session: a PUBLISH with a mostly plausible, sometimes extreme op block and
    weight, then RUNs of inputs that mostly fit; reads replies until the worker answers each or
    ends the session."""
    evil = RawMaster(address)
    evil.sock.settimeout(5)

    def pick(usual: list[int], extreme: list[int]) -> int:
        return rng.choice(extreme) if rng.random() < 0.15 else rng.choice(usual)

    kind, n = rng.choice([(1, 1), (2, 1), (3, 2)]) if rng.random() < 0.95 else (9, 1)
    pad = 2 - n
    stride = [pick([1, 2, 3], [0, 65536, 65537]) for _ in range(n)] + [0] * pad
    padding = [pick([0, 1, 2], [300, 65536]) for _ in range(n)] + [0] * pad
    dilation = [pick([1, 2], [0, 65536]) for _ in range(n)] + [0] * pad
    groups = pick([1, 1, 2], [0, 3, 65536])
    transposed = pick([0, 1], [2]) if kind == 1 else pick([0], [1])
    block = schema.OP_BLOCK.pack(kind, n, transposed, 0, *stride, *padding, *dilation, groups)
    dims = {1: 2, 2: 3, 3: 4}.get(kind, 2) if rng.random() < 0.9 else rng.randint(1, 5)
    w_shape = [rng.randint(0 if rng.random() < 0.1 else 1, 4) for _ in range(dims)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    dtype = rng.choice(dtypes)
    try:
        evil.tensor(Op.PUBLISH, 7, torch.randn(w_shape).to(dtype), block)
        evil.reply()
        for _ in range(3):
            if rng.random() < 0.2:
                x_shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 5))]
            elif kind == 1:
                x_shape = [rng.randint(0, 3), w_shape[-1]]
            else:
                x_shape = [rng.randint(0, 2), w_shape[1] * max(groups, 1)]
                x_shape += [rng.randint(1, 6) for _ in range(len(w_shape) - 2)]
            x = torch.randn(x_shape).to(rng.choice([dtype, *dtypes]))
            evil.tensor(Op.RUN, 7, x)
            header, _ = evil.reply()
            assert header.op in (Op.RESULT, Op.ERROR), header
    except (EOFError, OSError):
        pass  # the worker ended this session: its right
    finally:
        evil.close()


def test_fuzzed_op_blocks_and_shapes_never_take_the_worker_down() -> None:
    """Random op blocks (every field at or past its bounds), weights and inputs of any rank and
    dtype, from many sessions: the worker process survives and still serves an honest master."""
    proc = subprocess.Popen([sys.executable, "-c", FUZZ_WORKER], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        address = (LOOP, int(proc.stdout.readline().split()[1]))
        rng = random.Random(8)
        for _ in range(120):
            _fuzz_session(address, rng)
        assert proc.poll() is None
        honest = TcpTransport(address, "worker1", timeout_s=5)
        honest.publish("l0", torch.eye(3), LayerOp("linear"))
        assert torch.equal(honest.run("l0", torch.ones(2, 3)), torch.ones(2, 3))
        honest.close()
    finally:
        proc.kill()
        proc.wait()


# ---- 8. descriptor exhaustion: the acceptors must survive EMFILE ----------------------------

LOW_FD_SERVERS = r"""
import os, resource, sys, torch
from groupcover.wire.server import Limits, WorkerServer
from groupcover.wire.store import StoreServer
from groupcover.worker import WorkerState
torch.set_num_threads(1)
server = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")), Limits(timeout_s=30))
server.start()
rendezvous = StoreServer("127.0.0.1", 0, world_size=2, timeout_s=30)
used = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 6, hard))
print("ports", server.address[1], rendezvous.address[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def low_fd_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, tuple[str, int]], Path]]:
    """A worker server and a store in one process that has 6 spare descriptors; yields their
    addresses and the file that collects the process's stderr."""
    log = tmp_path_factory.mktemp("lowfd") / "stderr"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LOW_FD_SERVERS], env=ENV, stderr=err,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["ports"], line
        yield {"worker": (LOOP, int(line[1])), "store": (LOOP, int(line[2]))}, log
    finally:
        proc.kill()
        proc.wait()


def _flood(address: tuple[str, int], count: int = 24) -> None:
    """Opens more connections than the peer has descriptors for, then closes them all."""
    conns = [socket.create_connection(address, timeout=5) for _ in range(count)]
    time.sleep(0.5)  # the peer accepts until EMFILE
    for conn in conns:
        conn.close()
    time.sleep(0.5)


def test_the_worker_keeps_accepting_after_running_out_of_descriptors(
    low_fd_servers: tuple[dict[str, tuple[str, int]], Path],
) -> None:
    """Broke (fixed in groupcover/wire): WorkerServer._accept returns on any OSError: one
    EMFILE from accept() stops the worker accepting sessions for good.
    """
    addresses, log = low_fd_servers
    address = addresses["worker"]
    _flood(address)
    assert "worker: cannot accept a session (Too many open files)" in log.read_text()
    transport = TcpTransport(address, "worker1", timeout_s=3)  # a legitimate master, later
    transport.publish("l0", torch.eye(2), LayerOp("linear"))
    assert torch.equal(transport.run("l0", torch.ones(1, 2)), torch.ones(1, 2))
    transport.close()


def test_the_store_keeps_accepting_after_running_out_of_descriptors(
    low_fd_servers: tuple[dict[str, tuple[str, int]], Path],
) -> None:
    """Broke (fixed in groupcover/wire): StoreServer._accept returns on any OSError: one EMFILE
    from accept() stops the rendezvous for good.
    """
    addresses, log = low_fd_servers
    address = addresses["store"]
    _flood(address)
    assert "rendezvous: cannot accept a connection (Too many open files)" in log.read_text()
    client = StoreClient.connect(*address, time.monotonic() + 3, timeout_s=3)
    client.join(1)
    client.set("role/1", "worker")
    client.close()


# ---- 9. the rendezvous store and its peers -------------------------------------------------


@pytest.fixture
def store_server() -> Iterator[StoreServer]:
    made = StoreServer(LOOP, 0, world_size=3, timeout_s=DEADLINE_S)
    yield made
    made.close()


def test_a_slowloris_peer_is_cut_at_the_stores_deadline(store_server: StoreServer) -> None:
    message = store._pack(store.JOIN, ["1"])
    conn = socket.create_connection(store_server.address, timeout=5)
    start = time.monotonic()
    try:
        for i in range(len(message)):  # every byte in time for a per-read timeout
            try:
                conn.sendall(message[i : i + 1])
            except OSError:
                break
            time.sleep(0.15)
            if time.monotonic() - start > DEADLINE_S + SLACK_S:
                break
        assert _is_closed_by_peer(conn, DEADLINE_S + SLACK_S)
        assert time.monotonic() - start < DEADLINE_S + 2 * SLACK_S
    finally:
        conn.close()
    assert "gone/1" not in store_server.snapshot() and "role/1" not in store_server.snapshot()


@pytest.mark.parametrize("message", [
    store.HEAD.pack(store.MAGIC, store.VERSION, store.JOIN, 65535, 0),  # 65535 items
    store.HEAD.pack(store.MAGIC, store.VERSION, store.JOIN, 1, 0) + b"\xff\xff",  # a 64 KiB item
    store.HEAD.pack(store.MAGIC, store.VERSION, store.JOIN, 1, 0) + b"\x01\x00\x1b",  # ESC
    store.HEAD.pack(b"GCVW", store.VERSION, store.JOIN, 1, 0),
    store._pack(store.SET, ["role/1", "worker"]),  # before joining
    store._pack(store.WAIT, ["role/1"], 1000),  # reading before joining
], ids=["count", "length", "control-char", "magic", "set-unjoined", "wait-unjoined"])  # fmt: skip
def test_the_store_drops_an_oversized_or_unjoined_message_at_once(
    store_server: StoreServer, message: bytes
) -> None:
    conn = socket.create_connection(store_server.address, timeout=5)
    start = time.monotonic()
    try:
        conn.sendall(message)
        data = b""
        conn.settimeout(2)
        while chunk := conn.recv(4096):  # at most an ERR reply, then the close
            data += chunk
        assert len(data) < 256
        assert time.monotonic() - start < DEADLINE_S  # not a deadline: refused at once
    finally:
        conn.close()
    assert store_server.snapshot() == {}


def _fake_store(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket()
    listener.bind((LOOP, 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            if reply:
                conn.sendall(reply)
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("reply", [
    store.HEAD.pack(store.MAGIC, store.VERSION, store.OK, 16, 0) + b"\xff\xff" + b"A" * 65535,
    store.HEAD.pack(store.MAGIC, store.VERSION, store.OK, 65535, 0),
    b"",  # never answers
], ids=["huge-item", "huge-count", "silent"])  # fmt: skip
def test_a_hostile_store_cannot_make_a_rank_allocate_or_wait_past_its_deadline(
    reply: bytes,
) -> None:
    """With the network as the attacker the rendezvous can be impersonated too."""
    listener, thread = _fake_store(reply)
    host, port = listener.getsockname()[:2]
    client = StoreClient.connect(host, port, time.monotonic() + 3, DEADLINE_S)
    start = time.monotonic()
    try:
        with pytest.raises(StoreError):
            client._call(store.JOIN, ["1"])
        assert time.monotonic() - start < DEADLINE_S + SLACK_S
    finally:
        client.close()
        listener.close()
        thread.join(timeout=15)


def _slow_store(delay_s: float, roles: dict[str, str]) -> tuple[socket.socket, threading.Event]:
    """An impersonated rendezvous that speaks the protocol correctly, each answer late."""
    listener = socket.socket()
    listener.bind((LOOP, 0))
    listener.listen(4)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, StoreError):
            while not stop.is_set():
                op, _, items = store._read(conn, None)
                if stop.wait(delay_s):
                    return
                if op == store.WAIT:
                    found = [(k, roles[k]) for k in items if k in roles]
                    answer = store._pack(store.VALUE, list(found[0])) if found else (
                        store._pack(store.NONE, []))  # fmt: skip
                else:
                    answer = store._pack(store.OK, [])
                conn.sendall(answer)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, stop


def test_a_slow_store_cannot_stretch_join_past_its_deadline() -> None:
    """Broke (fixed in groupcover/wire): each store call had its own timeout on top of join's
    deadline, so a store answering every call just inside it stretched join to 3.6 times its
    deadline (more in larger worlds)."""
    timeout = 0.5
    listener, stop = _slow_store(0.9 * timeout, {"role/0": "worker", "role/1": "master"})
    port = listener.getsockname()[1]
    start = time.monotonic()
    membership = None
    try:
        with contextlib.suppress(WorkerUnavailable):
            membership = world.join(Rendezvous(1, 2, LOOP, port, timeout_s=timeout), "master")
        elapsed = time.monotonic() - start
        assert elapsed < timeout + SLACK_S, f"join took {elapsed:.2f} s (timeout {timeout} s)"
    finally:
        stop.set()
        listener.close()
        if membership is not None:
            membership.close()


class _Values:
    def __init__(self, value: str) -> None:
        self.value = value

    def get(self, key: str) -> str:
        return self.value


@pytest.mark.parametrize("value", ["dead.beef:80", "abc:80", "127.0.0.1:0", "127.0.0.1:65536",
                                   "1.2.3.4.5:80", ":80", "[::1]]:80x"])  # fmt: skip
def test_a_master_connects_only_to_an_ip_literal_and_a_real_port(value: str) -> None:
    """The announced address is checked by the master itself, not only by the store's grammar
    (a hostile or impersonated store may say anything).

    Broke (fixed in groupcover/wire): a non-numeric port ("80x") escaped address_of as a bare
    ValueError (a traceback, not a one-line error).
    """
    rdv = Rendezvous(0, 2, LOOP, 29500, timeout_s=1)
    membership = world.Membership(rdv, "master", _Values(value), {})  # type: ignore[arg-type]
    with pytest.raises(RendezvousError):
        membership.address_of(1)


def _join_master(rdv: Rendezvous) -> Future[world.Membership]:
    future: Future[world.Membership] = Future()

    def run() -> None:
        try:
            future.set_result(world.join(rdv, "master"))
        except BaseException as exc:  # handed to the test
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def _hostile_rank(port: int, rank: int, addr: str) -> StoreClient:
    client = StoreClient.connect(LOOP, port, time.monotonic() + 5, timeout_s=1.0)
    client.join(rank)
    client.set(f"addr/{rank}", addr)
    client.set(f"role/{rank}", "worker")
    return client


def test_rank_0_does_not_wait_for_ever_on_a_worker_that_never_finishes() -> None:
    """A hostile worker keeps its store connection alive (pings) but never records done: rank 0
    (the master, holding the store) must still exit within a deadline after its own work.

    Broke (fixed in groupcover/wire): Membership.finish: rank 0 waits with no deadline for
    done/N of every rank; a worker that keeps pinging and never records done keeps the
    master from exiting (and from reporting its error).
    """
    port = free_port()
    joining = _join_master(Rendezvous(0, 2, LOOP, port, timeout_s=1.0))
    hostile = _hostile_rank(port, 1, "127.0.0.1:9")
    membership = joining.result(timeout=5)
    outcome: Future[None] = Future()

    def finish() -> None:
        try:
            membership.finish(ok=False)
            outcome.set_result(None)
        except BaseException as exc:  # handed to the test
            outcome.set_exception(exc)

    thread = threading.Thread(target=finish, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        thread.join(timeout=2 * 1.0 + 2 * SLACK_S)
        assert not thread.is_alive(), "rank 0 still waits for the worker's done/1"
        error = outcome.exception()
        assert error is None or isinstance(error, GroupCoverError)
        if error is not None:
            assert isinstance(error, WorkerUnavailable) and "rank 1" in str(error)
        assert time.monotonic() - start < 2 * 1.0 + 2 * SLACK_S
    finally:
        hostile.close()  # lets a waiting rank 0 go (gone/1)
        thread.join(timeout=10)
