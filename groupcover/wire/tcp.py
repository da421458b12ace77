"""The default transport: one TCP connection per master session, tensors and nothing else.

`TcpTransport` (master side) sends each message as one `sendmsg` of the header and the tensor's
own buffer (no copy, no serialisation), and reads every reply as a fixed header that is checked
against what it expects (op, request id, layer, dtype, shape, memory order, exact byte count)
before a single payload byte is read; the payload then goes straight into a tensor the master
allocated from its own expectation, and is checked finite. Any violation, stall past the
deadline or early close breaks the session for good (`WorkerProtocolError` / `WorkerLost`, naming
the worker): no partial result is ever returned.

`WorkerServer` (worker side) accepts any number of sessions; each session's layers live in their
own namespace of the `WorkerState` and are released when the session ends, however it ends. It
checks requests too: sizes are bounded before anything is allocated.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from groupcover.errors import (
    GroupCoverError,
    UnknownLayer,
    UsageError,
    WorkerError,
    WorkerLost,
    WorkerProtocolError,
)
from groupcover.layer_op import LayerOp, PublishedRef
from groupcover.transport import Transport, payload_bytes
from groupcover.wire import schema
from groupcover.wire.schema import (
    BYTES,
    HEADER,
    MAX_TEXT,
    OP_BLOCK,
    REF_PAYLOAD,
    ErrorCode,
    Header,
    Op,
    SchemaError,
)
from groupcover.worker import NoPackage, PublishedMismatch, WorkerState, peak_rss_bytes

DEFAULT_TIMEOUT_S = 60.0
ACCEPT_RETRY_S = 0.05  # after accept() failed (out of descriptors): no spinning
PIPELINE_BYTES = 64 * 1024  # replies outstanding before a new request waits for them
WEIGHT_DIMS = {"linear": 2, "conv1d": 3, "conv2d": 4}


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Deadline(Exception):
    pass


class _Closed(Exception):
    pass


def _kernel_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """A deadline the kernel enforces on a blocking socket (0: none). Blocking calls with
    MSG_WAITALL wake this thread once per message, not once per segment and poll."""
    if sock.gettimeout() is not None:
        sock.settimeout(None)  # blocking mode: Python adds no poll() of its own
    whole = 0.0 if seconds is None else max(seconds, 1e-3)
    sock.setsockopt(socket.SOL_SOCKET, option,
                    struct.pack("ll", int(whole), int((whole % 1) * 1e6)))  # fmt: skip


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fills `view` from `sock`, never reading past it; `_Deadline` / `_Closed` on failure."""
    got, size = 0, len(view)
    while got < size:
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
        _kernel_timeout(sock, socket.SO_RCVTIMEO, remaining)
        try:
            n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError):
            continue  # the kernel's timeout: the loop checks the deadline
        except OSError as exc:
            raise _Closed(exc.strerror or type(exc).__name__) from None
        if n == 0:
            raise _Closed("connection closed")
        got += n


def send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview], deadline: float) -> None:
    """One `sendmsg` of every buffer (header and tensor bytes, no copy), resumed if partial."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        _kernel_timeout(sock, socket.SO_SNDTIMEO, remaining)
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, TimeoutError):
            continue
        except OSError as exc:
            raise _Closed(exc.strerror or type(exc).__name__) from None
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


# ---- the master's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    number: int
    op: LayerOp
    shape: tuple[int, ...]
    dtype: int


@dataclass
class _Pending:
    future: Future[torch.Tensor]
    request: int
    layer: int
    layer_id: str
    dtype: int
    shape: tuple[int, ...]
    order: tuple[int, ...]
    nbytes: int
    sent_bytes: int
    start: float


def allocate(dtype: int, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """The only place a reply buffer is allocated: from the master's expectation, never from
    what the worker claims (a test counts calls)."""
    return schema.empty_for(dtype, shape, order)


def all_finite(y: torch.Tensor, order: tuple[int, ...]) -> bool:
    """No NaN, no infinity: one pass over the memory, no intermediate the size of `y` (min and
    max propagate NaN; an infinity is one of them)."""
    if y.numel() == 0:
        return True
    low, high = torch.aminmax(y.permute(order).reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class _Reply(Future[torch.Tensor]):
    """A future that reads its own reply when asked for it (no reader thread, no handoff)."""

    def __init__(self, transport: TcpTransport) -> None:
        super().__init__()
        self._transport = transport

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if not self.done():
            self._transport._drain(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._transport._drain(self)
        return super().exception(timeout)


class TcpTransport(Transport):
    """One master session on one worker over its own TCP connection.

    `worker` names the worker in every error (e.g. "worker1"); `address` is where it listens.
    Each call's whole round trip must finish within `timeout_s`.
    """

    def __init__(
        self,
        address: tuple[str, int],
        worker: str = "worker",
        owner: str = "master",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if timeout_s <= 0:
            raise UsageError(f"timeout must be positive, not {timeout_s}")
        self.address = address
        self.label = f"{worker} at {address[0]}:{address[1]}"
        self.owner = owner
        self.timeout_s = timeout_s
        self.published_bytes = 0
        self.published_by_reference = 0
        self.published_by_tensor = 0  # PUBLISH_REF answered "no such package": sent instead
        self.device = "unknown"
        self._layers: dict[str, _Layer] = {}
        # Ids start at random points: a reply meant for another session never matches ours.
        self._next_request = int.from_bytes(os.urandom(8), "little") >> 2
        self._next_layer = int.from_bytes(os.urandom(4), "little") >> 2
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._lock = threading.RLock()
        self._header = bytearray(HEADER.size)
        self._broken: WorkerError | None = None
        self._closed = False
        deadline = time.monotonic() + timeout_s
        try:
            self._sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise WorkerLost(
                f"{self.label}: cannot connect: {exc.strerror or exc}",
                hint="is the worker process running and reachable?",
            ) from None
        _nodelay(self._sock)
        try:
            with self._lock:
                name = schema.text_view(owner)
                request = self._request()
                hello = Header(Op.HELLO, request, shape=(len(name),), order=(0,),
                               nbytes=len(name))  # fmt: skip
                self._send([hello.pack(), name], deadline)
                header = self._read_header(request, Op.WELCOME, 0, deadline)
                self.device = self._read_text(header, deadline)
        except BaseException:
            self._sock.close()  # no half-made session outlives a failed handshake
            raise

    # -- requests

    def _request(self) -> int:
        self._next_request = (self._next_request + 1) % (1 << 64)
        return self._next_request

    def _fail(self, message: str, cls: type[WorkerError] = WorkerProtocolError) -> WorkerError:
        """Breaks the session for good: later calls raise the same error, nothing half-done."""
        error = cls(f"{self.label}: {message}", hint=_HINT)
        if self._broken is None:
            self._broken = error
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            while self._pending:
                pending = self._pending.popleft()
                if not pending.future.done():
                    pending.future.set_exception(error)
            self._pending_bytes = 0
        return self._broken

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise UsageError(f"the session with {self.label} is closed")

    def _send(self, buffers: Sequence[bytes | memoryview], deadline: float) -> None:
        try:
            send_all(self._sock, buffers, deadline)
        except _Deadline:
            raise self._fail(f"stalled: a request was not taken within {self.timeout_s:g} s",
                             WorkerLost) from None  # fmt: skip
        except _Closed as exc:
            raise self._fail(f"connection lost while sending ({exc})", WorkerLost) from None

    def _recv(self, view: memoryview, deadline: float, what: str) -> None:
        try:
            recv_exact(self._sock, view, deadline)
        except _Deadline:
            raise self._fail(f"stalled: no complete {what} within {self.timeout_s:g} s",
                             WorkerLost) from None  # fmt: skip
        except _Closed as exc:
            raise self._fail(f"closed the connection early, during a {what} ({exc})",
                             WorkerLost) from None  # fmt: skip

    def _read_header(self, request: int, op: Op, layer: int, deadline: float) -> Header:
        """The next reply's header, checked for its request; an ERROR reply is raised here."""
        self._recv(memoryview(self._header), deadline, "reply header")
        try:
            header = Header.unpack(self._header)
        except SchemaError as exc:
            raise self._fail(f"malformed reply header: {exc}") from None
        if header.request != request:
            raise self._fail(f"reply to request {header.request}, expected {request}")
        if header.op == Op.ERROR:
            text = self._read_text(header, deadline)
            if header.flags == ErrorCode.UNKNOWN_LAYER:
                raise UnknownLayer(f"{self.label}: {text}")
            if header.flags == ErrorCode.NO_PACKAGE:
                raise _NoPackageReply(f"{self.label}: {text}")
            if header.flags == ErrorCode.DIGEST_MISMATCH:
                raise WorkerError(
                    f"{self.label} refused published layer: {text}",
                    hint="the worker's copy of published.safetensors is not this package's; "
                    "copy the package's file to the worker again",
                )
            raise WorkerError(f"{self.label}: {text}")
        if header.op != op:
            raise self._fail(f"sent a {header.op.name} reply, expected {op.name}")
        if header.layer != layer:
            raise self._fail(f"reply for layer {header.layer}, expected {layer}")
        if header.flags:
            raise self._fail(f"reply flags {header.flags}, expected 0")
        return header

    def _read_text(self, header: Header, deadline: float) -> str:
        if header.dtype != BYTES or header.nbytes > MAX_TEXT:
            raise self._fail(f"{header.op.name} payload is not short text ({header.nbytes} bytes)")
        data = bytearray(header.nbytes)
        self._recv(memoryview(data), deadline, f"{header.op.name} text")
        return schema.decode_text(bytes(data))

    def _expect_empty(self, header: Header) -> None:
        if header.nbytes or header.shape:
            raise self._fail(f"{header.op.name} reply carries {header.nbytes} unexpected bytes")

    # -- the Transport interface

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        with self._lock:
            self._check_usable()
            if layer_id in self._layers:
                raise UsageError(f"layer {layer_id!r} is already published to {self.label}")
            sent, order = schema.as_wire(weight)
            try:
                code = schema.dtype_code(sent.dtype)
                block = schema.pack_op(op)
            except SchemaError as exc:
                raise UsageError(f"cannot publish {layer_id!r}: {exc}") from None
            self._emit("publish", layer_id, sent)
            self._next_layer += 1
            number = self._next_layer
            request = self._request()
            shape = tuple(sent.shape)
            header = Header(Op.PUBLISH, request, number, code, shape, order, payload_bytes(sent))
            deadline = time.monotonic() + self.timeout_s
            self._drain_all(deadline)
            self._send([header.pack(), block, schema.byte_view(sent, order)], deadline)
            reply = self._read_header(request, Op.OK, number, deadline)
            self._expect_empty(reply)
            self._layers[layer_id] = _Layer(number, op, shape, code)
            self.published_bytes += payload_bytes(sent)

    def publish_ref(
        self,
        layer_id: str,
        ref: PublishedRef,
        op: LayerOp,
        load: Callable[[], torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        """PUBLISH_REF: the worker loads the layer from its own copy of the package; a worker
        without that package gets the tensor instead (PUBLISH), one whose copy does not match
        the digest is an error."""
        with self._lock:
            self._check_usable()
            if layer_id in self._layers:
                raise UsageError(f"layer {layer_id!r} is already published to {self.label}")
            try:
                code = schema.dtype_code(dtype)
                block = schema.pack_op(op)
                ref_block = schema.pack_ref(ref, code)
            except SchemaError as exc:
                raise UsageError(f"cannot publish {layer_id!r}: {exc}") from None
            if self._observers:  # the audit sees what the worker will hold
                self._emit("publish", layer_id, load())
            self._next_layer += 1
            number = self._next_layer
            request = self._request()
            header = Header(Op.PUBLISH_REF, request, number, BYTES, (REF_PAYLOAD,), (0,),
                            REF_PAYLOAD)  # fmt: skip
            deadline = time.monotonic() + self.timeout_s
            self._drain_all(deadline)
            self._send([header.pack(), block, ref_block], deadline)
            try:
                reply = self._read_header(request, Op.OK, number, deadline)
            except _NoPackageReply:
                self.publish(layer_id, load(), op)  # the old path: the tensor itself
                self.published_by_tensor += 1
                return
            self._expect_empty(reply)
            self._layers[layer_id] = _Layer(number, op, ref.shape, code)
            self.published_by_reference += 1

    def worker_peak_rss(self) -> int | None:
        """The worker process's peak resident set in bytes (MEMORY), None if it cannot say."""
        try:
            return int(self._simple(Op.MEMORY).value)
        except WorkerError:
            return None

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        future = _Reply(self)
        with self._lock:
            try:
                self._check_usable()
                layer = self._layers.get(layer_id)
                if layer is None:
                    raise UnknownLayer(f"{self.label} holds no layer {layer_id!r} for this master")
                sent, order = schema.as_wire(x)
                try:
                    code = schema.dtype_code(sent.dtype)
                    out_shape = schema.output_shape(layer.op, tuple(sent.shape), layer.shape)
                except SchemaError as exc:
                    raise UsageError(f"cannot run {layer_id!r}: {exc}") from None
            except GroupCoverError as exc:
                future.set_exception(exc)
                return future
            self._emit("run", layer_id, sent)
            request = self._request()
            shape = tuple(sent.shape)
            header = Header(Op.RUN, request, layer.number, code, shape, order, payload_bytes(sent))
            out_order = schema.output_order(layer.op, len(out_shape))
            out_bytes = schema.tensor_nbytes(layer.dtype, out_shape)
            start = time.perf_counter()
            deadline = time.monotonic() + self.timeout_s
            try:
                if self._pending and self._pending_bytes + out_bytes > PIPELINE_BYTES:
                    self._drain_all(deadline)  # never let both sides block on full buffers
                self._send([header.pack(), schema.byte_view(sent, order)], deadline)
            except WorkerError as exc:
                future.set_exception(exc)
                return future
            self._pending.append(_Pending(future, request, layer.number, layer_id, layer.dtype,
                                          out_shape, out_order, out_bytes, header.nbytes,
                                          start))  # fmt: skip
            self._pending_bytes += out_bytes
        return future

    def run(self, layer_id: str, x: torch.Tensor) -> torch.Tensor:
        return self.run_async(layer_id, x).result()

    def _drain(self, target: Future[torch.Tensor]) -> None:
        with self._lock:
            deadline = time.monotonic() + self.timeout_s
            while not target.done() and self._pending:
                self._complete_next(deadline)

    def _drain_all(self, deadline: float) -> None:
        while self._pending:
            self._complete_next(deadline)

    def _complete_next(self, deadline: float) -> None:
        pending = self._pending[0]
        deadline = min(deadline, time.monotonic() + self.timeout_s)
        try:
            y, worker_s = self._receive_result(pending, deadline)
        except WorkerError as exc:
            if self._pending and self._pending[0] is pending:
                self._pending.popleft()
                self._pending_bytes -= pending.nbytes
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        self._pending.popleft()
        self._pending_bytes -= pending.nbytes
        timings = self.timings
        roundtrip = time.perf_counter() - pending.start
        timings.roundtrip_s += roundtrip
        timings.worker_s += min(worker_s, roundtrip)
        timings.calls += 1
        timings.bytes_sent += pending.sent_bytes
        timings.bytes_received += pending.nbytes
        pending.future.set_result(y)

    def _receive_result(self, p: _Pending, deadline: float) -> tuple[torch.Tensor, float]:
        header = self._read_header(p.request, Op.RESULT, p.layer, deadline)
        if header.dtype != p.dtype:
            raise self._fail(f"result of dtype code {header.dtype}, expected {p.dtype}")
        if header.shape != p.shape:
            raise self._fail(f"result of shape {header.shape}, expected {p.shape}")
        if header.order != p.order:
            raise self._fail(f"result in memory order {header.order}, expected {p.order}")
        if header.nbytes != p.nbytes:  # implied by dtype and shape; checked on its own anyway
            raise self._fail(f"result of {header.nbytes} bytes, expected {p.nbytes}")
        y = allocate(p.dtype, p.shape, p.order)
        self._recv(schema.byte_view(y, p.order), deadline, f"result for {p.layer_id!r}")
        if not all_finite(y, p.order):
            raise self._fail(f"result for {p.layer_id!r} holds NaN or infinite values")
        return y, header.value

    def _simple(self, op: Op) -> Header:
        with self._lock:
            self._check_usable()
            deadline = time.monotonic() + self.timeout_s
            self._drain_all(deadline)
            request = self._request()
            self._send([Header(op, request).pack()], deadline)
            reply = self._read_header(request, Op.OK, 0, deadline)
            self._expect_empty(reply)
            return reply

    def worker_sessions(self) -> int:
        """How many sessions hold layers on the worker (for tests and diagnostics)."""
        return int(self._simple(Op.STATS).value)

    def close(self) -> None:
        """Releases this session's layers on the worker and closes the connection."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._broken is None:
                    self._simple(Op.RELEASE)
            finally:
                self._closed = True
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                self._sock.close()


class _NoPackageReply(WorkerError):
    pass


_HINT = "the worker broke the protocol or stopped answering; it is not trusted, nothing of its " \
    "reply was used"  # fmt: skip


# ---- the worker's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds a worker holds each session to before it allocates anything."""

    max_tensor_bytes: int = 8 << 30
    max_session_bytes: int = 64 << 30
    max_layers: int = 100_000
    timeout_s: float = DEFAULT_TIMEOUT_S  # to finish a message once its header arrived


class _SessionEnd(Exception):
    pass


class WorkerServer:
    """Serves sessions on `host:port` (0: any free port) until `stop()`; one thread each."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        state: WorkerState | None = None,
        limits: Limits | None = None,
        name: str = "worker",
    ) -> None:
        self.state = state if state is not None else WorkerState()
        self.limits = limits or Limits()
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}  # live sessions only
        self._lock = threading.Lock()
        self._count = 0
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept, name="gc-worker-accept",
                                          daemon=True)  # fmt: skip

    def start(self) -> WorkerServer:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        for conn in accept_forever(self._listener, lambda: self._stopping, self.name, "session"):
            _nodelay(conn)
            with self._lock:
                self._count += 1
                number = self._count
                self._sessions[number] = conn
                thread = threading.Thread(target=self._session, args=(number, conn),
                                          name=f"gc-session-{number}", daemon=True)  # fmt: skip
                self._threads[number] = thread
                # started under the lock: stop() must never see a thread it cannot join yet
                thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._sessions.values())
            threads = list(self._threads.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)

    # -- one session

    def _session(self, number: int, conn: socket.socket) -> None:
        owner = f"session{number}"
        try:
            _Session(self, conn, owner).serve()
        except _SessionEnd as end:
            if str(end):
                print(f"groupcover: {self.name}: {owner} ended: {end}", file=sys.stderr,
                      flush=True)  # fmt: skip
        except Exception as exc:  # a bug must not take the other sessions down
            print(f"groupcover: {self.name}: {owner} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)  # fmt: skip
        finally:
            self.state.release(owner)
            with self._lock:
                self._sessions.pop(number, None)
                self._threads.pop(number, None)  # a connect/close loop must leave no trace
            with contextlib.suppress(OSError):
                conn.close()


class _Session:
    def __init__(self, server: WorkerServer, conn: socket.socket, owner: str) -> None:
        self.server = server
        self.conn = conn
        self.owner = owner
        self.limits = server.limits
        self.header = bytearray(HEADER.size)
        self.published = 0
        self.layers: dict[int, tuple[tuple[int, ...], LayerOp, int, int]] = {}
        self.greeted = False

    def _recv(self, view: memoryview, deadline: float | None) -> None:
        try:
            recv_exact(self.conn, view, deadline)
        except _Deadline:
            raise _SessionEnd("the master stalled mid-message") from None
        except _Closed as exc:
            raise _SessionEnd("" if deadline is None else f"closed mid-message ({exc})") from None

    def _send(self, buffers: Sequence[bytes | memoryview]) -> None:
        try:
            send_all(self.conn, buffers, time.monotonic() + self.limits.timeout_s)
        except (_Deadline, _Closed):
            raise _SessionEnd("the master stopped reading replies") from None

    def _reply(self, op: Op, request: int, layer: int = 0, value: float = 0.0) -> None:
        self._send([Header(op, request, layer, value=value).pack()])

    def _error(self, request: int, code: ErrorCode, text: str) -> None:
        data = schema.text_view(text)
        header = Header(Op.ERROR, request, shape=(len(data),), order=(0,), nbytes=len(data),
                        flags=int(code))  # fmt: skip
        self._send([header.pack(), data])

    def _refuse(self, request: int, code: ErrorCode, text: str) -> None:
        """An error after which the session cannot continue (its payload was not read)."""
        with contextlib.suppress(_SessionEnd):
            self._error(request, code, text)
        raise _SessionEnd(text)

    def _begin(self, deadline: float | None) -> None:
        """Waits for the first byte of the next request (a clean close here ends quietly)."""
        try:
            recv_exact(self.conn, memoryview(self.header)[:1], deadline)
        except _Deadline:
            raise _SessionEnd("no HELLO within the deadline") from None
        except _Closed:
            raise _SessionEnd("") from None

    def serve(self) -> None:
        accepted = time.monotonic()
        while True:
            if self.greeted:
                self._begin(None)  # idle: a master may think for long
                deadline = time.monotonic() + self.limits.timeout_s
            else:  # a peer that has not said HELLO is owed nothing: one deadline from accept
                deadline = accepted + self.limits.timeout_s
                self._begin(deadline)
            self._recv(memoryview(self.header)[1:], deadline)  # a message begun must finish
            try:
                header = Header.unpack(self.header)
            except SchemaError as exc:
                raise _SessionEnd(f"malformed request header: {exc}") from None
            if header.op not in schema.REQUESTS:
                raise _SessionEnd(f"{header.op.name} is not a request")
            if not self.greeted and header.op != Op.HELLO:
                raise _SessionEnd("the first message was not HELLO")
            if header.nbytes > self.limits.max_tensor_bytes:
                self._refuse(
                    header.request,
                    ErrorCode.TOO_LARGE,
                    f"a {header.nbytes}-byte payload is over the worker's limit",
                )
            self._handle(header, deadline)

    def _handle(self, header: Header, deadline: float) -> None:
        if header.op == Op.HELLO:
            if header.dtype != BYTES or header.nbytes > MAX_TEXT or self.greeted:
                raise _SessionEnd("malformed HELLO")
            name = bytearray(header.nbytes)
            self._recv(memoryview(name), deadline)
            self.greeted = True
            device = schema.text_view(str(self.server.state.device))
            welcome = Header(Op.WELCOME, header.request, shape=(len(device),), order=(0,),
                             nbytes=len(device))  # fmt: skip
            self._send([welcome.pack(), device])
        elif header.op == Op.PUBLISH:
            self._publish(header, deadline)
        elif header.op == Op.RUN:
            self._run(header, deadline)
        elif header.op == Op.RELEASE:
            self._empty(header)
            count = self.server.state.release(self.owner)
            self.layers.clear()
            self.published = 0
            self._reply(Op.OK, header.request, value=float(count))
        elif header.op == Op.STATS:
            self._empty(header)
            self._reply(Op.OK, header.request, value=float(len(self.server.state.owners())))
        elif header.op == Op.MEMORY:
            self._empty(header)
            self._reply(Op.OK, header.request, value=float(peak_rss_bytes()))
        elif header.op == Op.PUBLISH_REF:
            self._publish_ref(header, deadline)

    def _empty(self, header: Header) -> None:
        if header.nbytes or header.shape or header.layer:
            raise _SessionEnd(f"{header.op.name} carries a payload")

    def _tensor(self, header: Header, deadline: float) -> torch.Tensor:
        if header.dtype == BYTES:
            raise _SessionEnd(f"{header.op.name} without a tensor")
        tensor = schema.empty_for(header.dtype, header.shape, header.order)
        self._recv(schema.byte_view(tensor, header.order), deadline)
        return tensor

    def _publish(self, header: Header, deadline: float) -> None:
        block = bytearray(OP_BLOCK.size)
        self._recv(memoryview(block), deadline)
        if self.published + header.nbytes > self.limits.max_session_bytes:
            self._refuse(header.request, ErrorCode.TOO_LARGE, "the session's weights are over "
                         "the worker's limit")  # fmt: skip
        if header.layer not in self.layers and len(self.layers) >= self.limits.max_layers:
            self._refuse(header.request, ErrorCode.TOO_LARGE, "too many layers in one session")
        weight = self._tensor(header, deadline)
        try:
            op = schema.unpack_op(block)
        except SchemaError as exc:
            self._error(header.request, ErrorCode.BAD_REQUEST, f"bad layer op: {exc}")
            return
        if weight.dim() != WEIGHT_DIMS[op.kind]:
            self._error(header.request, ErrorCode.BAD_REQUEST,
                        f"a {op.kind} weight cannot have shape {header.shape}")  # fmt: skip
            return
        self.server.state.publish(self.owner, str(header.layer), weight, op)
        previous = self.layers.get(header.layer)
        if previous is not None:
            self.published -= previous[2]
        self.layers[header.layer] = (header.shape, op, header.nbytes, header.dtype)
        self.published += header.nbytes
        self._reply(Op.OK, header.request, header.layer)

    def _publish_ref(self, header: Header, deadline: float) -> None:
        if header.dtype != BYTES or header.nbytes != REF_PAYLOAD:
            raise _SessionEnd("malformed PUBLISH_REF")
        data = bytearray(REF_PAYLOAD)
        self._recv(memoryview(data), deadline)
        if header.layer not in self.layers and len(self.layers) >= self.limits.max_layers:
            self._refuse(header.request, ErrorCode.TOO_LARGE, "too many layers in one session")
        try:
            op = schema.unpack_op(data[: OP_BLOCK.size])
            ref, compute = schema.unpack_ref(data[OP_BLOCK.size :])
        except SchemaError as exc:
            self._error(header.request, ErrorCode.BAD_REQUEST, f"bad published reference: {exc}")
            return
        if len(ref.shape) != WEIGHT_DIMS[op.kind]:
            self._error(header.request, ErrorCode.BAD_REQUEST,
                        f"a {op.kind} weight cannot have shape {ref.shape}")  # fmt: skip
            return
        nbytes = schema.tensor_nbytes(compute, ref.shape)
        if nbytes > self.limits.max_tensor_bytes or \
                self.published + nbytes > self.limits.max_session_bytes:  # fmt: skip
            self._error(header.request, ErrorCode.TOO_LARGE, "the session's weights are over "
                        "the worker's limit")  # fmt: skip
            return
        try:
            self.server.state.publish_ref(self.owner, str(header.layer), ref,
                                          schema.DTYPES[compute], op)  # fmt: skip
        except NoPackage as exc:
            self._error(header.request, ErrorCode.NO_PACKAGE, exc.message)
            return
        except PublishedMismatch as exc:
            print(f"groupcover: {self.server.name}: refused published layer {ref.index}: "
                  f"{exc.message}", file=sys.stderr, flush=True)  # fmt: skip
            self._error(header.request, ErrorCode.DIGEST_MISMATCH, exc.message)
            return
        previous = self.layers.get(header.layer)
        if previous is not None:
            self.published -= previous[2]
        self.layers[header.layer] = (ref.shape, op, nbytes, compute)
        self.published += nbytes
        self._reply(Op.OK, header.request, header.layer)

    def _run(self, header: Header, deadline: float) -> None:
        x = self._tensor(header, deadline)
        layer = self.layers.get(header.layer)
        if layer is None:
            self._error(header.request, ErrorCode.UNKNOWN_LAYER,
                        f"no layer {header.layer} in this session")  # fmt: skip
            return
        w_shape, op, _, w_dtype = layer
        try:
            out_shape = schema.output_shape(op, header.shape, w_shape)
        except SchemaError as exc:
            self._error(header.request, ErrorCode.BAD_REQUEST, str(exc))
            return
        out_bytes = schema.tensor_nbytes(w_dtype, out_shape)  # computed in the weight's dtype
        if out_bytes > self.limits.max_tensor_bytes:  # a tiny input can ask for a huge output
            self._error(header.request, ErrorCode.TOO_LARGE,
                        f"a {out_bytes}-byte result is over the worker's limit")  # fmt: skip
            return
        try:
            y, worker_s = self.server.state.run(self.owner, str(header.layer), x)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._error(header.request, ErrorCode.COMPUTE_FAILED, f"compute failed: {first}")
            return
        order = schema.output_order(op, len(out_shape))
        if tuple(y.shape) != out_shape:
            self._error(header.request, ErrorCode.COMPUTE_FAILED, "unexpected output shape")
            return
        if not y.permute(order).is_contiguous():
            y = y.permute(order).contiguous().permute(_inverse(order))
        code = schema.dtype_code(y.dtype)
        reply = Header(Op.RESULT, header.request, header.layer, code, out_shape, order,
                       payload_bytes(y), value=worker_s)  # fmt: skip
        self._send([reply.pack(), schema.byte_view(y, order)])


def _inverse(order: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


__all__ = ["Limits", "TcpTransport", "WorkerServer"]


def accept_forever(
    listener: socket.socket, closing: Callable[[], bool], name: str, what: str
) -> Iterator[socket.socket]:
    """Accepted connections until `closing()` or the listener is closed.

    EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: a peer can cause these at will, so they must not
    stop a server accepting; it says so once and retries every ACCEPT_RETRY_S (no spinning).
    """
    failing = False
    while not closing():
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            if closing() or exc.errno in (errno.EBADF, errno.EINVAL):
                return
            if not failing:
                print(f"groupcover: {name}: cannot accept a {what} ({exc.strerror or exc}); "
                      "retrying", file=sys.stderr, flush=True)  # fmt: skip
            failing = True
            time.sleep(ACCEPT_RETRY_S)
            continue
        failing = False
        yield conn
