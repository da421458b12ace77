"""The master's side of the default wire (it runs in the TEE): `TcpTransport`, one TCP
connection per master session, tensors and nothing else.

Each message is one `sendmsg` of the header and the tensor's own buffer (no copy, no
serialisation); every reply is read as a fixed header that is checked against what the master
expects (op, request id, layer, dtype, shape, memory order, exact byte count) before a single
payload byte is read; the payload then goes straight into a tensor the master allocated from its
own expectation, and is checked finite. Any violation, stall past the deadline or early close
breaks the session for good (`WorkerProtocolError` / `WorkerLost`, naming the worker): no partial
result is ever returned.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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
from groupcover.rendezvous import DEFAULT_TIMEOUT_S
from groupcover.tensorpass import note_received_abs_max
from groupcover.transport import Transport, payload_bytes
from groupcover.wire import schema
from groupcover.wire.schema import (
    BYTES,
    HEADER,
    MAX_TEXT,
    REF_PAYLOAD,
    ErrorCode,
    Header,
    Op,
    SchemaError,
)
from groupcover.wire.sockets import Closed, Deadline, nodelay, recv_exact, send_all

__all__ = ["TcpTransport"]

PIPELINE_BYTES = 64 * 1024  # replies outstanding before a new request waits for them


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
    max propagate NaN; an infinity is one of them). A finite y gets max |y| noted on it
    (`tensorpass.note_received_abs_max`): the integrity check's scale, without a second pass."""
    if y.numel() == 0 or not y.is_floating_point():
        return True  # integers (residues) are always finite
    low, high = (float(v) for v in torch.aminmax(y.permute(order).reshape(-1)))
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    note_received_abs_max(y, max(high, -low))
    return True


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
        nodelay(self._sock)
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
        except Deadline:
            raise self._fail(f"stalled: a request was not taken within {self.timeout_s:g} s",
                             WorkerLost) from None  # fmt: skip
        except Closed as exc:
            raise self._fail(f"connection lost while sending ({exc})", WorkerLost) from None

    def _recv(self, view: memoryview, deadline: float, what: str) -> None:
        try:
            recv_exact(self._sock, view, deadline)
        except Deadline:
            raise self._fail(f"stalled: no complete {what} within {self.timeout_s:g} s",
                             WorkerLost) from None  # fmt: skip
        except Closed as exc:
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
            out_code = schema.result_dtype(layer.op, layer.dtype)
            out_bytes = schema.tensor_nbytes(out_code, out_shape)
            start = self.timings.start()
            deadline = time.monotonic() + self.timeout_s
            try:
                if self._pending and self._pending_bytes + out_bytes > PIPELINE_BYTES:
                    self._drain_all(deadline)  # never let both sides block on full buffers
                self._send([header.pack(), schema.byte_view(sent, order)], deadline)
            except WorkerError as exc:
                future.set_exception(exc)
                return future
            self._pending.append(_Pending(future, request, layer.number, layer_id, out_code,
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
        self.timings.record(pending.start, worker_s, pending.sent_bytes, pending.nbytes)
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
