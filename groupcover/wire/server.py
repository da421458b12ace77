"""The worker's side of the default wire: `WorkerServer` accepts any number of master sessions.

Each session's layers live in their own namespace of the `WorkerState` and are released when the
session ends, however it ends. It checks requests too: sizes are bounded before anything is
allocated. Nothing a master sends is ever unpickled or executed.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from groupcover.layer_op import LayerOp
from groupcover.rendezvous import DEFAULT_TIMEOUT_S
from groupcover.transport import payload_bytes
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
from groupcover.wire.sockets import Closed, Deadline, accept_forever, nodelay, recv_exact, send_all
from groupcover.worker import NoPackage, PublishedMismatch, WorkerState, peak_rss_bytes

__all__ = ["Limits", "WorkerServer"]

WEIGHT_DIMS = {"linear": 2, "conv1d": 3, "conv2d": 4}


RUN_BYTES_PER_TENSOR_BYTE = 8  # the default bound of a RUN's allocations, x max_tensor_bytes
MAX_RUN_MACS = 2_500 * 10**9  # twice bert-base's largest call at MAX_BATCH x MAX_SEQ
SKIP_CHUNK = 1 << 16  # a refused payload is read into a buffer this size, never allocated


@dataclass(frozen=True)
class Limits:
    """Bounds a worker holds each session to before it allocates anything.

    A RUN is priced from the op and the shapes before its input is read (`schema.run_cost`):
    `max_run_bytes` bounds everything its computation allocates (None: 8 x `max_tensor_bytes`),
    `max_run_macs` its multiply-accumulates, which is the only deadline a computation can have
    (a torch op cannot be interrupted).
    """

    max_tensor_bytes: int = 8 << 30
    max_session_bytes: int = 64 << 30
    max_layers: int = 100_000
    timeout_s: float = DEFAULT_TIMEOUT_S  # to finish a message once its header arrived
    max_run_bytes: int | None = None
    max_run_macs: int = MAX_RUN_MACS

    @property
    def run_bytes(self) -> int:
        if self.max_run_bytes is not None:
            return self.max_run_bytes
        return RUN_BYTES_PER_TENSOR_BYTE * self.max_tensor_bytes


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
            nodelay(conn)
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
        except Deadline:
            raise _SessionEnd("the master stalled mid-message") from None
        except Closed as exc:
            raise _SessionEnd("" if deadline is None else f"closed mid-message ({exc})") from None

    def _send(self, buffers: Sequence[bytes | memoryview]) -> None:
        try:
            send_all(self.conn, buffers, time.monotonic() + self.limits.timeout_s)
        except (Deadline, Closed):
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
        except Deadline:
            raise _SessionEnd("no HELLO within the deadline") from None
        except Closed:
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
        if header.dtype == BYTES:
            raise _SessionEnd("RUN without a tensor")
        refusal = self._price(header)
        if refusal is not None:  # the input is read past, never allocated
            self._skip(header.nbytes, deadline)
            self._error(header.request, *refusal)
            return
        x = self._tensor(header, deadline)
        w_shape, op, _, _ = self.layers[header.layer]
        out_shape = schema.output_shape(op, header.shape, w_shape)
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

    def _price(self, header: Header) -> tuple[ErrorCode, str] | None:
        """Why this RUN is refused, from its header alone; None if it may run."""
        layer = self.layers.get(header.layer)
        if layer is None:
            return ErrorCode.UNKNOWN_LAYER, f"no layer {header.layer} in this session"
        w_shape, op, _, w_dtype = layer
        try:
            out_shape = schema.output_shape(op, header.shape, w_shape)
            cost = schema.run_cost(op, header.shape, w_shape, schema.itemsize(w_dtype))
        except SchemaError as exc:
            return ErrorCode.BAD_REQUEST, str(exc)
        # computed in the weight's dtype; a quantized op's result is int32
        out_bytes = schema.tensor_nbytes(schema.result_dtype(op, w_dtype), out_shape)
        if out_bytes > self.limits.max_tensor_bytes:  # a tiny input can ask for a huge output
            return ErrorCode.TOO_LARGE, f"a {out_bytes}-byte result is over the worker's limit"
        if cost.nbytes > self.limits.run_bytes:  # a convolution's unfolded input, say
            return ErrorCode.TOO_LARGE, (
                f"a {op.kind} that allocates up to {cost.nbytes} bytes is over the worker's "
                f"limit of {self.limits.run_bytes} per call"
            )
        if cost.macs > self.limits.max_run_macs:  # what bounds a call's time
            return ErrorCode.TOO_LARGE, (
                f"a {op.kind} of {cost.macs} multiply-accumulates is over the worker's limit "
                f"of {self.limits.max_run_macs} per call"
            )
        return None

    def _skip(self, nbytes: int, deadline: float) -> None:
        """Reads past a refused payload through one small buffer, so the session goes on."""
        scratch = memoryview(bytearray(min(nbytes, SKIP_CHUNK)))
        while nbytes > 0:
            chunk = min(nbytes, len(scratch))
            self._recv(scratch[:chunk], deadline)
            nbytes -= chunk


def _inverse(order: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse
