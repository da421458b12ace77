"""Red team against the default wire (groupcover/wire), part one: hostile workers, each a real
peer in its own thread or process over loopback, against the real master. Part two,
test_redteam_wire_peers.py, holds hostile masters sharing a worker, descriptor exhaustion and
hostile peers on the rendezvous.

Each test asserts the behaviour the channel claims. The attacks that broke a claim say so in
their docstring ("Broke ..."): they were committed as strict xfails, then fixed in
groupcover/wire, and stay as regression tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from groupcover.errors import (
    UnknownLayer,
    WorkerError,
    WorkerLost,
    WorkerProtocolError,
)
from groupcover.layer_op import apply_op
from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp
from groupcover.wire import client as wire_client
from groupcover.wire import schema
from groupcover.wire.client import TcpTransport
from groupcover.wire.schema import BYTES, HEADER, ErrorCode, Header, Op
from groupcover.wire.store import StoreClient, StoreError
from tests.unit.hostile_worker import raw, read_request, recv_exact, tensor_of
from tests.unit.test_redteam_wire_peers import _hostile_rank, _join_master
from tests.unit.transports import free_port

LOOP = "127.0.0.1"
DEADLINE_S = 0.6
SLACK_S = 1.0  # scheduling on a shared 2-core host
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# byte offsets of the header fields (<4s H H Q I B B H 6Q 6B 2x Q d)
OFF_REQUEST, OFF_LAYER, OFF_DTYPE, OFF_NDIM, OFF_FLAGS = 8, 16, 20, 21, 22
OFF_SHAPE, OFF_ORDER, OFF_NBYTES, OFF_VALUE = 24, 72, 80, 88


# ---- a scripted hostile worker (a thread with its own listening socket) ------------------------


class FakeWorker:
    """Listens on loopback; runs `script(conn, self)` for each connection in its own thread."""

    def __init__(self, script: Callable[[socket.socket, FakeWorker], None]) -> None:
        self.script = script
        self.stop = threading.Event()
        self.closed = threading.Event()  # set by scripts that watch for the master's close
        self.listener = socket.socket()
        self.listener.bind((LOOP, 0))
        self.listener.listen(16)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(EOFError, OSError):
            self.script(conn, self)

    def close(self) -> None:
        self.stop.set()
        for sock in (self.listener, *self.conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def fake_worker() -> Iterator[Callable[..., FakeWorker]]:
    made: list[FakeWorker] = []

    def start(script: Callable[[socket.socket, FakeWorker], None]) -> FakeWorker:
        made.append(FakeWorker(script))
        return made[-1]

    yield start
    for fake in made:
        fake.close()


def welcome(conn: socket.socket, device: bytes = b"cpu") -> Header:
    hello, _, _ = read_request(conn)
    assert hello.op == Op.HELLO
    conn.sendall(raw(Header(Op.WELCOME, hello.request, shape=(len(device),), order=(0,),
                            nbytes=len(device))) + device)  # fmt: skip
    return hello


def accept_publish(conn: socket.socket) -> tuple[torch.Tensor, LayerOp]:
    header, block, payload = read_request(conn)
    assert header.op == Op.PUBLISH
    conn.sendall(raw(Header(Op.OK, header.request, header.layer)))
    return tensor_of(header, payload), schema.unpack_op(block)


def read_run(conn: socket.socket, weight: torch.Tensor, op: LayerOp) -> tuple[Header, torch.Tensor]:
    header, _, payload = read_request(conn)
    assert header.op == Op.RUN
    x = tensor_of(header, payload)
    return header, apply_op(op, x.to(weight.dtype), weight).contiguous()


def result_bytes(asked: Header, y: torch.Tensor) -> bytes:
    header = Header(Op.RESULT, asked.request, asked.layer, schema.dtype_code(y.dtype),
                    tuple(y.shape), tuple(range(y.dim())), y.numel() * y.element_size(),
                    value=1e-4)  # fmt: skip
    return raw(header) + bytes(schema.byte_view(y, tuple(range(y.dim()))))


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


class Allocations:
    """Counts the master's reply buffers (wire_client.allocate is the only place they are made)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shapes: list[tuple[int, ...]] = []
        real = wire_client.allocate

        def counted(dtype: int, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
            self.shapes.append(shape)
            return real(dtype, shape, order)

        monkeypatch.setattr(wire_client, "allocate", counted)


def victim(address: tuple[str, int], weight: torch.Tensor | None = None,
           op: LayerOp | None = None) -> TcpTransport:  # fmt: skip
    transport = TcpTransport(address, "worker1", owner="victim", timeout_s=DEADLINE_S)
    transport.publish(
        "l0", torch.randn(4, 3) if weight is None else weight, op or LayerOp("linear")
    )
    return transport


def abandon(transport: TcpTransport) -> None:
    """Drops a session with a fake that serves no RELEASE."""
    transport._closed = True
    transport._sock.close()


def assert_fault(exc: BaseException, address: tuple[str, int], elapsed: float) -> str:
    message = str(exc)
    assert message.startswith(f"worker1 at {address[0]}:{address[1]}: "), message
    assert "\n" not in message and all(32 <= ord(c) < 127 for c in message), message
    assert elapsed < DEADLINE_S + SLACK_S, f"{elapsed:.2f} s"
    return message


# ---- 1. crafted reply headers: every field at or past its bounds ----------------------------

# the product of these dims is 2^62 + 8: times 4 bytes it is 2^64 + 32, i.e. 32 (the expected
# reply's size) in a 64-bit field
WRAPPING_DIMS = (24, 2833, 37171, 1824726041)


def _wrap(asked: Header, good: bytes) -> bytes:
    assert (24 * 2833 * 37171 * 1824726041 * 4) % (1 << 64) == 32
    return raw(Header(Op.RESULT, asked.request, asked.layer, 1, WRAPPING_DIMS, (0, 1, 2, 3), 32))


CRAFTED: list[tuple[str, Callable[[Header, bytes], bytes], str]] = [
    ("scalar-result",
     lambda h, g: raw(Header(Op.RESULT, h.request, h.layer, 1, (), (), 4)) + b"\0" * 4,
     "shape (), expected (2, 4)"),
    ("unused-shape-field", lambda h, g: patched(g, OFF_SHAPE + 5 * 8, u64(1)), "unused dimension"),
    ("unused-order-field", lambda h, g: patched(g, OFF_ORDER + 5, b"\x05"), "unused dimension"),
    ("order-duplicate", lambda h, g: patched(g, OFF_ORDER, b"\0\0"), "not a permutation"),
    ("order-out-of-range", lambda h, g: patched(g, OFF_ORDER + 1, b"\xc8"), "not a permutation"),
    ("ndim-255", lambda h, g: patched(g, OFF_NDIM, b"\xff"), "255 dimensions"),
    ("ndim-0-with-shape", lambda h, g: patched(g, OFF_NDIM, b"\0"), "unused dimension"),
    ("byte-count-wraps-64-bits", _wrap, "payload of 32 bytes"),
    ("byte-count-mod-2^64-zero",
     lambda h, g: raw(Header(Op.RESULT, h.request, h.layer, 1, (1 << 32, 1 << 30), (0, 1), 0)),
     "payload of 0 bytes"),
    ("dim-2^64-1", lambda h, g: patched(g, OFF_SHAPE + 8, u64((1 << 64) - 1)), "out of range"),
    ("zero-dim-consistent",
     lambda h, g: raw(Header(Op.RESULT, h.request, h.layer, 1, (0, 1 << 40), (0, 1), 0)),
     "expected (2, 4)"),
    ("request-2^64-1",
     lambda h, g: patched(g, OFF_REQUEST, u64((1 << 64) - 1)), "reply to request"),
    ("request-low-32-bits",
     lambda h, g: patched(g, OFF_REQUEST, u64(h.request & 0xFFFFFFFF)), "reply to request"),
    ("request-of-the-publish",
     lambda h, g: patched(g, OFF_REQUEST, u64(h.request - 1)), "reply to request"),
    ("layer-2^32-1", lambda h, g: patched(g, OFF_LAYER, b"\xff" * 4), "reply for layer"),
    ("dtype-255", lambda h, g: patched(g, OFF_DTYPE, b"\xff"), "unknown dtype"),
    ("dtype-bytes",
     lambda h, g: raw(Header(Op.RESULT, h.request, h.layer, BYTES, (32,), (0,), 32)) + b"A" * 32,
     "dtype code 0, expected 1"),
    ("flags-65535", lambda h, g: patched(g, OFF_FLAGS, b"\xff\xff"), "reply flags 65535"),
    ("value-negative",
     lambda h, g: patched(g, OFF_VALUE, struct.pack("<d", -1.0)),
     "not a finite"),
    ("value-inf", lambda h, g: patched(g, OFF_VALUE, b"\0" * 6 + b"\xf0\x7f"), "not a finite"),
    ("a-request-op-as-reply", lambda h, g: patched(g, 6, b"\x01\x00"), "sent a HELLO reply"),
    ("error-with-tensor-text",
     lambda h, g: raw(Header(Op.ERROR, h.request, 0, 1, (128,), (0,), 512, flags=1)),
     "not short text"),
    ("error-text-513",
     lambda h, g: raw(Header(Op.ERROR, h.request, 0, BYTES, (513,), (0,), 513, flags=2)),
     "not short text (513 bytes)"),
    ("magic-lowercase", lambda h, g: patched(g, 0, b"gcvw"), "bad magic"),
    ("version-0", lambda h, g: patched(g, 4, b"\0\0"), "protocol version 0"),
    ("version-65535", lambda h, g: patched(g, 4, b"\xff\xff"), "protocol version 65535"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "craft", "words"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_reply_header_is_refused_before_any_allocation(
    fake_worker: Callable[..., FakeWorker],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    craft: Callable[[Header, bytes], bytes],
    words: str,
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        weight, op = accept_publish(conn)
        asked, y = read_run(conn, weight, op)
        conn.sendall(craft(asked, result_bytes(asked, y)) + b"\0" * 64)
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = victim(fake.address)
    allocations = Allocations(monkeypatch)
    start = time.monotonic()
    with pytest.raises(WorkerProtocolError) as caught:
        transport.run("l0", torch.randn(2, 3))
    message = assert_fault(caught.value, fake.address, time.monotonic() - start)
    assert words in message, message
    assert allocations.shapes == []
    with pytest.raises(WorkerProtocolError):  # broken for good
        transport.run("l0", torch.randn(2, 3))
    transport.close()


# ---- 2. ERROR replies: huge, binary, control characters -------------------------------------


def test_error_text_is_one_bounded_printable_line_and_the_session_goes_on(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    text = bytes(range(256)) * 2  # 512 bytes: NUL, \n, \r, ESC, DEL, every non-ASCII byte

    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        weight, op = accept_publish(conn)
        for flags in (0xFFFF, ErrorCode.UNKNOWN_LAYER):
            asked, _ = read_run(conn, weight, op)
            conn.sendall(raw(Header(Op.ERROR, asked.request, 0, BYTES, (512,), (0,), 512,
                                    flags=int(flags))) + text)  # fmt: skip
        asked, y = read_run(conn, weight, op)
        conn.sendall(result_bytes(asked, y))
        fake.stop.wait(30)

    fake = fake_worker(script)
    weight = torch.randn(4, 3)
    transport = victim(fake.address, weight)
    for cls in (WorkerError, UnknownLayer):
        start = time.monotonic()
        with pytest.raises(WorkerError) as caught:
            transport.run("l0", torch.randn(2, 3))
        assert type(caught.value) is cls
        message = assert_fault(caught.value, fake.address, time.monotonic() - start)
        assert len(message) <= len(transport.label) + 2 + 512
    x = torch.randn(2, 3)
    assert torch.allclose(transport.run("l0", x), x @ weight.T)  # an ERROR is no partial state
    abandon(transport)


# ---- 3. pipelined requests answered out of order, twice, or with another's id ------------------


@pytest.mark.parametrize("answer", ["second-first", "first-twice", "error-then-first-id"])
def test_pipelined_replies_must_come_in_order(
    fake_worker: Callable[..., FakeWorker], answer: str
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        weight, op = accept_publish(conn)
        asked = [read_run(conn, weight, op) for _ in range(3)]
        (h1, y1), (h2, y2), _ = asked
        if answer == "second-first":
            conn.sendall(result_bytes(h2, y2) + result_bytes(h1, y1))
        elif answer == "first-twice":
            conn.sendall(result_bytes(h1, y1) + result_bytes(h1, y1))
        else:  # a non-fatal ERROR for the first, then the second's result under the first's id
            conn.sendall(raw(Header(Op.ERROR, h1.request, 0, BYTES, (2,), (0,), 2, flags=4))
                         + b"no" + result_bytes(h1, y2))  # fmt: skip
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = victim(fake.address)
    futures = [transport.run_async("l0", torch.randn(2, 3)) for _ in range(3)]
    start = time.monotonic()
    outcomes: list[object] = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except WorkerError as exc:
            outcomes.append(exc)
    elapsed = time.monotonic() - start
    bad = [o for o in outcomes if isinstance(o, WorkerProtocolError)]
    assert bad, outcomes
    assert_fault(bad[0], fake.address, elapsed)
    assert "reply to request" in str(bad[0])
    first_bad = outcomes.index(bad[0])
    # nothing after the break is a result: every later future carries the error
    assert all(isinstance(o, WorkerError) for o in outcomes[first_bad:]), outcomes
    if answer == "first-twice":
        assert isinstance(outcomes[0], torch.Tensor)
    transport.close()


# ---- 4. deadlines over the whole message, at every stage ----------------------------------------


def _drip(conn: socket.socket, fake: FakeWorker, data: bytes, pause_s: float) -> None:
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])
        if fake.stop.wait(pause_s):
            return


@pytest.mark.parametrize("stage", ["welcome", "result-payload", "error-text", "publish-ok"])
def test_a_reply_dripped_in_time_for_each_read_but_not_overall_is_a_stall(
    fake_worker: Callable[..., FakeWorker], stage: str
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        if stage == "welcome":
            hello, _, _ = read_request(conn)
            reply = raw(Header(Op.WELCOME, hello.request, shape=(3,), order=(0,), nbytes=3))
            _drip(conn, fake, reply + b"cpu", 0.02)  # 99 bytes: ~2 s
            return
        welcome(conn)
        if stage == "publish-ok":
            header, _, _ = read_request(conn)
            _drip(conn, fake, raw(Header(Op.OK, header.request, header.layer)), 0.02)
            return
        weight, op = accept_publish(conn)
        asked, y = read_run(conn, weight, op)
        if stage == "result-payload":
            data = result_bytes(asked, y)
            conn.sendall(data[: HEADER.size])
            _drip(conn, fake, data[HEADER.size :], 0.004)  # 64 KiB: minutes in all
        else:
            conn.sendall(raw(Header(Op.ERROR, asked.request, 0, BYTES, (512,), (0,), 512,
                                    flags=2)))  # fmt: skip
            _drip(conn, fake, b"x" * 512, 0.01)  # ~5 s

    fake = fake_worker(script)
    start = time.monotonic()
    with pytest.raises(WorkerLost) as caught:
        if stage == "welcome":
            TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)
        elif stage == "publish-ok":
            victim(fake.address)
        else:
            transport = victim(fake.address, torch.randn(128, 3))
            start = time.monotonic()
            transport.run("l0", torch.randn(128, 3))
    elapsed = time.monotonic() - start
    assert "stalled" in assert_fault(caught.value, fake.address, elapsed)
    assert elapsed >= DEADLINE_S * 0.9


@pytest.mark.parametrize("how", ["never-reads", "resets-while-reading"])
def test_a_worker_that_will_not_take_a_large_request_is_a_fault(
    fake_worker: Callable[..., FakeWorker], how: str
) -> None:
    """16 MiB of weight, more than the socket buffers hold: the master's send is held to the
    deadline too, and a reset mid-send is a lost worker, not a crash (no SIGPIPE)."""

    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        if how == "resets-while-reading":
            recv_exact(conn, HEADER.size + 4096)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)
    start = time.monotonic()
    with pytest.raises(WorkerLost) as caught:
        transport.publish("l0", torch.zeros(2048, 2048), LayerOp("linear"))
    message = assert_fault(caught.value, fake.address, time.monotonic() - start)
    words = "a request was not taken" if how == "never-reads" else "connection lost while sending"
    assert words in message or "closed the connection early" in message, message
    with pytest.raises(WorkerLost):
        transport.run("l0", torch.zeros(1, 2048))


# ---- 5. NaN and infinities in every carried dtype, as raw bit patterns ------------------------

SPECIALS = [
    (torch.float16, torch.int16, [0x7E00, 0x7C01, 0xFC01, 0xFFFF, 0x7C00, 0xFC00]),
    (torch.bfloat16, torch.int16, [0x7FC0, 0x7F81, 0xFF81, 0xFFFF, 0x7F80, 0xFF80]),
    (torch.float32, torch.int32, [0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000]),
    (torch.float64, torch.int64, [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF0000000000000]),
]
CASES = [(dtype, view, bits, pos) for dtype, view, many in SPECIALS for bits in many
         for pos in (0, -1)]  # fmt: skip


def _signed(bits: int, view: torch.dtype) -> int:
    width = torch.iinfo(view).bits
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


@pytest.mark.parametrize(("dtype", "view", "bits", "pos"), CASES,
                         ids=[f"{c[0]}-{c[2]:#x}-{c[3]}" for c in CASES])  # fmt: skip
def test_nan_and_inf_bit_patterns_are_refused(
    fake_worker: Callable[..., FakeWorker],
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    view: torch.dtype,
    bits: int,
    pos: int,
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        weight, op = accept_publish(conn)
        asked, y = read_run(conn, weight, op)
        y.view(view).view(-1)[pos] = _signed(bits, view)
        conn.sendall(result_bytes(asked, y))
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = victim(fake.address, torch.randn(37, 5).to(dtype))
    allocations = Allocations(monkeypatch)
    start = time.monotonic()
    with pytest.raises(WorkerProtocolError) as caught:
        transport.run("l0", torch.randn(3, 5).to(dtype))
    assert "NaN or infinite" in assert_fault(caught.value, fake.address, time.monotonic() - start)
    assert allocations.shapes == [(3, 37)]
    transport.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_extremes_are_not_refused(
    fake_worker: Callable[..., FakeWorker], dtype: torch.dtype
) -> None:
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0])

    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn)
        weight, op = accept_publish(conn)
        asked, y = read_run(conn, weight, op)
        y.view(-1)[:6] = extremes.to(dtype)
        conn.sendall(result_bytes(asked, y))
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = victim(fake.address, torch.randn(8, 2).to(dtype))
    y = transport.run("l0", torch.randn(1, 2).to(dtype))
    assert torch.equal(y.view(-1)[:6], extremes.to(dtype))
    abandon(transport)


# ---- 6. a worker that greets, then says more than it was asked ------------------------------


@pytest.mark.parametrize("extra", ["a-result", "an-ok-for-a-guessed-layer", "a-megabyte"])
def test_unsolicited_data_after_welcome_breaks_the_session(
    fake_worker: Callable[..., FakeWorker], extra: str
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        hello = welcome(conn)
        if extra == "a-result":
            conn.sendall(raw(Header(Op.RESULT, hello.request + 1, 1, 1, (1,), (0,), 4)) + b"\0" * 4)
        elif extra == "an-ok-for-a-guessed-layer":  # the next request id is predictable
            conn.sendall(raw(Header(Op.OK, hello.request + 1, 1)))
        else:
            conn.sendall(b"\x41" * (1 << 20))
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)
    start = time.monotonic()
    with pytest.raises(WorkerProtocolError) as caught:
        transport.publish("l0", torch.randn(4, 3), LayerOp("linear"))
    assert_fault(caught.value, fake.address, time.monotonic() - start)
    with pytest.raises(WorkerProtocolError):  # nothing was recorded, the session is over
        transport.run("l0", torch.randn(2, 3))
    transport.close()


def test_a_welcome_text_reaches_the_master_as_printable_ascii(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn, bytes(range(256)) * 2)
        fake.stop.wait(30)

    fake = fake_worker(script)
    transport = TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)
    assert len(transport.device) == 512 and all(32 <= ord(c) < 127 for c in transport.device)
    abandon(transport)


def test_a_welcome_over_the_text_limit_is_refused(fake_worker: Callable[..., FakeWorker]) -> None:
    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn, b"x" * 513)
        fake.stop.wait(30)

    fake = fake_worker(script)
    with pytest.raises(WorkerProtocolError, match="513 bytes"):
        TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)


def test_a_failed_handshake_closes_the_masters_connection(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    """A worker that answers HELLO with ERROR: the master raises, and must not keep the
    connection (a half-made session) open for as long as someone holds the exception.

    Broke (fixed in groupcover/wire): an ERROR reply to HELLO raises from
    TcpTransport.__init__ without closing the socket: the connection stays open while the
    exception (and its traceback) lives.
    """

    def script(conn: socket.socket, fake: FakeWorker) -> None:
        hello, _, _ = read_request(conn)
        conn.sendall(raw(Header(Op.ERROR, hello.request, 0, BYTES, (2,), (0,), 2, flags=2)) + b"no")
        conn.settimeout(5)
        if conn.recv(1) == b"":
            fake.closed.set()

    fake = fake_worker(script)
    with pytest.raises(WorkerError) as caught:
        TcpTransport(fake.address, "worker1", timeout_s=DEADLINE_S)
    assert str(caught.value).startswith("worker1 at ")
    assert fake.closed.wait(2), "the master kept the failed connection open"


# ---- a fake worker on the rendezvous (the rest of the rendezvous: test_redteam_wire_peers.py) --


def test_a_fake_worker_that_takes_the_workers_rank_is_visible(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    """A peer that joins as the worker's rank before it does and announces its own address:
    the real worker is refused (it sees "taken"), and the master names where it connected."""

    def script(conn: socket.socket, fake: FakeWorker) -> None:
        welcome(conn, b"fake")
        fake.stop.wait(30)

    fake = fake_worker(script)
    port = free_port()
    joining = _join_master(Rendezvous(0, 2, LOOP, port, timeout_s=2.0))
    hostile = _hostile_rank(port, 1, f"{fake.address[0]}:{fake.address[1]}")
    membership = joining.result(timeout=5)
    try:
        real = StoreClient.connect(LOOP, port, time.monotonic() + 5, timeout_s=1.0)
        with pytest.raises(StoreError, match="taken"):
            real.join(1)
        real.close()
        transport = membership.connect(1, "0/probe", DEADLINE_S)
        assert transport.label == f"worker1 at {fake.address[0]}:{fake.address[1]}"
        assert transport.device == "fake"
        abandon(transport)
    finally:
        membership.close()
        hostile.close()
