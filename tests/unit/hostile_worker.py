"""A hostile worker for tests/unit/test_hostile_worker.py: `python -m tests.unit.hostile_worker
MARKER`. It prints `port N`, then serves any number of sessions until stdin closes.

Each session speaks the wire honestly (HELLO, PUBLISH) until its first RUN, then misbehaves as
the master's HELLO name says (the test names each session after the attack it wants). A pickle
it sends would create MARKER if anyone unpickled it.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import threading
import time

import torch

from groupcover.layer_op import apply_op
from groupcover.wire import schema
from groupcover.wire.schema import HEADER, OP_BLOCK, Header, Op

MARKER = sys.argv[1] if len(sys.argv) > 1 else "/nonexistent/marker"
_last_reply: dict[str, bytes] = {}  # "honest" sessions record theirs, for replays elsewhere


class Payload:
    """Unpickling this runs a shell command (what a torch-rpc peer can send)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


PICKLE = pickle.dumps(Payload())


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def read_request(conn: socket.socket) -> tuple[Header, bytes, bytes]:
    header = Header.unpack(recv_exact(conn, HEADER.size))
    block = recv_exact(conn, OP_BLOCK.size) if header.op == Op.PUBLISH else b""
    return header, block, recv_exact(conn, header.nbytes)


def tensor_of(header: Header, payload: bytes) -> torch.Tensor:
    tensor = schema.empty_for(header.dtype, header.shape, header.order)
    schema.byte_view(tensor, header.order)[:] = payload
    return tensor


def session(conn: socket.socket) -> None:
    behaviour = "honest"
    layers: dict[int, tuple[torch.Tensor, object]] = {}
    try:
        while True:
            header, block, payload = read_request(conn)
            if header.op == Op.HELLO:
                behaviour = payload.decode()
                device = b"cpu"
                conn.sendall(Header(Op.WELCOME, header.request, shape=(3,), order=(0,),
                                    nbytes=3).pack() + device)  # fmt: skip
            elif header.op == Op.PUBLISH:
                layers[header.layer] = (tensor_of(header, payload), schema.unpack_op(block))
                conn.sendall(Header(Op.OK, header.request, header.layer).pack())
            elif header.op in (Op.RELEASE, Op.STATS):
                conn.sendall(Header(Op.OK, header.request).pack())
            elif header.op == Op.RUN:
                weight, op = layers[header.layer]
                x = tensor_of(header, payload)
                y = apply_op(op, x.to(weight.dtype), weight).contiguous()  # type: ignore[arg-type]
                misbehave(conn, behaviour, header, y)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def result_header(asked: Header, y: torch.Tensor, **changes: object) -> Header:
    fields: dict[str, object] = {
        "op": Op.RESULT, "request": asked.request, "layer": asked.layer,
        "dtype": schema.dtype_code(y.dtype), "shape": tuple(y.shape),
        "order": tuple(range(y.dim())), "nbytes": y.numel() * y.element_size(), "value": 1e-3,
    }  # fmt: skip
    fields.update(changes)
    return Header(**fields)  # type: ignore[arg-type]


def raw(header: Header) -> bytes:
    """Packs a header without any of `Header`'s own checks (the attacker's crafted bytes)."""
    ndim = len(header.shape)
    pad = schema.MAX_NDIM - ndim
    return HEADER.pack(
        header.magic, header.version, header.op, header.request, header.layer, header.dtype, ndim,
        header.flags, *header.shape, *([0] * pad), *header.order, *([0] * pad), header.nbytes,
        header.value,
    )  # fmt: skip


def data(y: torch.Tensor) -> bytes:
    return bytes(schema.byte_view(y, tuple(range(y.dim()))))


def misbehave(conn: socket.socket, behaviour: str, request: Header, y: torch.Tensor) -> None:
    good = raw(result_header(request, y)) + data(y)
    numel = y.numel()
    if behaviour in ("honest", "record"):
        _last_reply["record"] = good
        conn.sendall(good)
    elif behaviour == "replay-other-master":  # another session's reply, verbatim
        conn.sendall(_last_reply["record"])
    elif behaviour == "pickle-instead-of-reply":
        conn.sendall(PICKLE.ljust(4 * HEADER.size, b"\0"))
    elif behaviour == "pickle-as-payload":
        conn.sendall(raw(result_header(request, y)) + PICKLE.ljust(numel * 4, b"\0")[: numel * 4])
    elif behaviour == "pickle-as-error-text":
        conn.sendall(raw(Header(Op.ERROR, request.request, shape=(len(PICKLE),), order=(0,),
                                nbytes=len(PICKLE), flags=2)) + PICKLE)  # fmt: skip
    elif behaviour == "bad-magic":
        conn.sendall(raw(result_header(request, y, magic=b"EVIL")) + data(y))
    elif behaviour == "bad-version":
        conn.sendall(raw(result_header(request, y, version=99)) + data(y))
    elif behaviour == "unknown-op":
        conn.sendall(raw(result_header(request, y, op=0x77)) + data(y))
    elif behaviour == "wrong-op":
        conn.sendall(raw(result_header(request, y, op=Op.WELCOME)) + data(y))
    elif behaviour == "wrong-dtype":
        y64 = y.double()
        conn.sendall(raw(result_header(request, y64)) + data(y64))
    elif behaviour == "wrong-shape":
        conn.sendall(raw(result_header(request, y, shape=tuple(reversed(y.shape)))) + data(y))
    elif behaviour == "wrong-order":
        conn.sendall(raw(result_header(request, y, order=(1, 0))) + data(y))
    elif behaviour == "too-many-dims":
        crafted = bytearray(raw(result_header(request, y)))
        crafted[21] = 7  # the ndim byte
        conn.sendall(bytes(crafted) + data(y))
    elif behaviour == "length-short":
        conn.sendall(raw(result_header(request, y, nbytes=numel * 4 - 4)) + data(y)[:-4])
    elif behaviour == "length-long":
        conn.sendall(raw(result_header(request, y, nbytes=numel * 4 + 4)) + data(y) + b"\0" * 4)
    elif behaviour == "length-2^62":
        conn.sendall(raw(result_header(request, y, nbytes=1 << 62)) + data(y))
    elif behaviour == "length-2^62-consistent":  # shape and length agree: 2^60 float32
        conn.sendall(raw(result_header(request, y, shape=(1 << 30, 1 << 30), nbytes=1 << 62)))
    elif behaviour == "error-2^62":
        conn.sendall(raw(Header(Op.ERROR, request.request, shape=(1 << 62,), order=(0,),
                                nbytes=1 << 62, flags=2)))  # fmt: skip
    elif behaviour == "nan":
        bad = y.clone()
        bad.view(-1)[numel // 2] = float("nan")
        conn.sendall(raw(result_header(request, bad)) + data(bad))
    elif behaviour == "inf":
        bad = y.clone()
        bad.view(-1)[0] = float("-inf")
        conn.sendall(raw(result_header(request, bad)) + data(bad))
    elif behaviour == "nan-value-field":
        conn.sendall(raw(result_header(request, y, value=float("nan"))) + data(y))
    elif behaviour == "other-layer":
        conn.sendall(raw(result_header(request, y, layer=request.layer + 1)) + data(y))
    elif behaviour == "other-request":
        conn.sendall(raw(result_header(request, y, request=request.request + 1)) + data(y))
    elif behaviour == "stall-in-header":
        conn.sendall(good[: HEADER.size // 2])
        time.sleep(60)
    elif behaviour == "stall-in-payload":
        conn.sendall(good[: HEADER.size + 4])
        time.sleep(60)
    elif behaviour == "stall-silent":
        time.sleep(60)
    elif behaviour == "drip":  # every byte in time for a per-read timeout, never in time overall
        for i in range(len(good)):
            conn.sendall(good[i : i + 1])
            time.sleep(0.05)
    elif behaviour == "close-in-header":
        conn.sendall(good[:10])
        conn.close()
    elif behaviour == "close-in-payload":
        conn.sendall(good[: HEADER.size + 4])
        conn.close()
    elif behaviour == "close-before-reply":
        conn.close()
    elif behaviour == "reset":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    elif behaviour == "two-replies":  # a second, unrequested reply rides along
        conn.sendall(good + good)
    else:
        raise SystemExit(f"unknown behaviour {behaviour!r}")


def main() -> None:
    torch.set_num_threads(1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"port {listener.getsockname()[1]}", flush=True)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main()
