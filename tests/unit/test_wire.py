"""The wire's parts on their own: the schema (header, op block, layouts), the worker server's own
checks and per-session namespaces, the rendezvous store's grammar and liveness, and the
interface address lookup."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from groupcover.errors import RendezvousError, UnknownLayer, UsageError
from groupcover.layer_op import LayerOp
from groupcover.wire import schema
from groupcover.wire.client import TcpTransport
from groupcover.wire.netif import interface_address
from groupcover.wire.schema import HEADER, OP_BLOCK, ErrorCode, Header, Op, SchemaError
from groupcover.wire.server import Limits, WorkerServer
from groupcover.wire.store import StoreClient, StoreError, StoreServer
from groupcover.worker import WorkerState

# ---- schema ----------------------------------------------------------------------------------


def test_header_is_fixed_and_round_trips() -> None:
    assert HEADER.size == 96 and OP_BLOCK.size == 36
    header = Header(Op.RUN, 2**63, 7, 2, (2, 3, 5), (2, 0, 1), 2 * 3 * 5 * 8, value=0.5)
    packed = header.pack()
    assert len(packed) == 96 and packed[:4] == b"GCVW"
    assert Header.unpack(packed) == header


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"magic": b"GCVX"}, "bad magic"),
        ({"version": 2}, "protocol version"),
        ({"op": 9}, "unknown op"),
        ({"dtype": 9}, "unknown dtype"),
        ({"nbytes": 33}, "payload of 33 bytes"),
        ({"nbytes": 1 << 62}, "payload of"),
        ({"order": (0, 0)}, "not a permutation"),
        ({"shape": (1 << 41, 1)}, "out of range"),
        ({"value": float("inf")}, "not a finite"),
        ({"value": -1.0}, "not a finite"),
    ],
)
def test_header_refuses_what_it_can_check_alone(patch: dict, message: str) -> None:
    fields = {"op": Op.RESULT, "request": 1, "layer": 1, "dtype": 1, "shape": (2, 4),
              "order": (0, 1), "nbytes": 32, **patch}  # fmt: skip
    ndim = len(fields["shape"])
    packed = struct.pack(
        "<4sHHQIBBH6Q6B2xQd", fields.get("magic", b"GCVW"), fields.get("version", 1),
        fields["op"], 1, 1, fields["dtype"], ndim, 0, *fields["shape"], *[0] * (6 - ndim),
        *fields["order"], *[0] * (6 - ndim), fields["nbytes"], fields.get("value", 0.0),
    )  # fmt: skip
    with pytest.raises(SchemaError, match=message):
        Header.unpack(packed)


@pytest.mark.parametrize(
    "op",
    [
        LayerOp("linear"),
        LayerOp("linear", params={"transposed": 1}),
        LayerOp("conv1d", stride=(2,), padding=(1,), dilation=(3,)),
        LayerOp("conv2d", stride=(1, 2), padding=(3, 0), dilation=(1, 1), params={"groups": 2}),
    ],
)
def test_op_block_round_trips(op: LayerOp) -> None:
    assert schema.unpack_op(schema.pack_op(op)) == op


def test_op_block_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(SchemaError, match="no wire encoding"):
        schema.pack_op(LayerOp("linear", params={"fancy": 1}))
    with pytest.raises(SchemaError, match="transposed"):
        schema.pack_op(LayerOp("conv1d", params={"transposed": 1}))
    crafted = bytearray(schema.pack_op(LayerOp("linear")))
    crafted[0] = 9
    with pytest.raises(SchemaError, match="kind code 9"):
        schema.unpack_op(crafted)


def test_dense_layouts_travel_as_they_are_and_views_are_copied() -> None:
    features_first = torch.randn(5, 12).t().view(3, 4, 5)
    sent, order = schema.as_wire(features_first)
    assert sent.data_ptr() == features_first.data_ptr() and order == (2, 0, 1)
    view = torch.randn(8, 8)[:, ::2]
    sent, order = schema.as_wire(view)
    assert sent.is_contiguous() and order == (0, 1) and torch.equal(sent, view)
    back = schema.empty_for(1, (3, 4, 5), (2, 0, 1))
    schema.byte_view(back, (2, 0, 1))[:] = schema.byte_view(*schema.as_wire(features_first))
    assert torch.equal(back, features_first) and back.stride() == features_first.stride()


def test_expected_output_shapes() -> None:
    assert schema.output_shape(LayerOp("linear"), (2, 7, 5), (8, 5)) == (2, 7, 8)
    conv = LayerOp("conv2d", stride=(2, 2), padding=(1, 1))
    assert schema.output_shape(conv, (2, 3, 7, 7), (4, 3, 3, 3)) == tuple(
        F.conv2d(torch.zeros(2, 3, 7, 7), torch.zeros(4, 3, 3, 3), stride=2, padding=1).shape
    )
    with pytest.raises(SchemaError, match="does not fit"):
        schema.output_shape(LayerOp("linear"), (2, 4), (8, 5))


# ---- the worker server, in this process ------------------------------------------------------


@pytest.fixture
def server() -> Iterator[WorkerServer]:
    made = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")),
                        Limits(max_tensor_bytes=1 << 20, max_session_bytes=2 << 20,
                               timeout_s=2.0)).start()  # fmt: skip
    yield made
    made.stop()


def test_a_session_is_released_when_its_master_vanishes(server: WorkerServer) -> None:
    """(Sessions being separate is in test_transport.py, for every transport.)"""
    a = TcpTransport(server.address, "worker1", "a", timeout_s=5)
    b = TcpTransport(server.address, "worker1", "b", timeout_s=5)
    a.publish("l0", torch.eye(3), LayerOp("linear"))
    b.publish("l0", 2 * torch.eye(3), LayerOp("linear"))
    x = torch.ones(1, 3)
    assert a.worker_sessions() == 2
    a._sock.close()  # a master that vanishes without RELEASE
    deadline = time.monotonic() + 5
    while len(server.state.owners()) != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.state.owners()) == 1
    b.close()
    with pytest.raises(UsageError, match="closed"):
        b.run("l0", x)


def _raw_session(server: WorkerServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    hello = Header(Op.HELLO, 1, shape=(1,), order=(0,), nbytes=1)
    sock.sendall(hello.pack() + b"t")
    reply = Header.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
    sock.recv(reply.nbytes, socket.MSG_WAITALL)
    return sock


def test_worker_refuses_oversized_requests_before_reading_them(server: WorkerServer) -> None:
    sock = _raw_session(server)
    huge = Header(Op.RUN, 2, 1, 1, (1 << 28, 1 << 20), (0, 1), (1 << 48) * 4)
    sock.sendall(huge.pack())
    reply = Header.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
    assert reply.op == Op.ERROR and reply.flags == ErrorCode.TOO_LARGE
    sock.recv(reply.nbytes, socket.MSG_WAITALL)
    assert sock.recv(1) == b""  # and the session is over
    sock.close()


def test_worker_refuses_a_session_that_does_not_start_with_hello(server: WorkerServer) -> None:
    sock = socket.create_connection(server.address, timeout=5)
    sock.sendall(Header(Op.STATS, 1).pack())
    assert sock.recv(1) == b""
    sock.close()


def test_unknown_layer_and_a_misfit_input_are_worker_errors(server: WorkerServer) -> None:
    transport = TcpTransport(server.address, "worker1", timeout_s=5)
    with pytest.raises(UnknownLayer, match=r"worker1 at 127\.0\.0\.1"):
        transport.run("never", torch.ones(1, 2))
    transport.publish("l0", torch.eye(3), LayerOp("linear"))
    with pytest.raises(UsageError, match="does not fit"):
        transport.run("l0", torch.ones(1, 2))
    torch.testing.assert_close(transport.run("l0", torch.ones(1, 3)), torch.ones(1, 3))
    transport.close()


# ---- the rendezvous store ---------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[StoreServer]:
    made = StoreServer("127.0.0.1", 0, world_size=3, timeout_s=1.0)
    yield made
    made.close()


def _client(store: StoreServer, rank: int) -> StoreClient:
    client = StoreClient.connect(*store.address, time.monotonic() + 5, timeout_s=1.0)
    client.join(rank)
    return client


def test_store_binds_only_the_given_address(store: StoreServer) -> None:
    assert store.address[0] == "127.0.0.1"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", store.address[1]), timeout=2)


def test_store_holds_data_of_a_fixed_grammar(store: StoreServer) -> None:
    one, two = _client(store, 1), _client(store, 2)
    one.set("role/1", "worker")
    one.set("addr/1", "127.0.0.1:40000")
    assert two.get("role/1") == "worker" and two.get("addr/1") == "127.0.0.1:40000"
    for key, value, message in [
        ("role/2", "worker", "may not set"),  # another rank's key
        ("gone/1", "x", "may not set"),  # the store's own
        ("role/1", "master", "already set"),  # write once
        ("done/1", "maybe", "bad value"),
        ("addr/1", "$(reboot)", "bad value"),
        ("code/1", "x", "may not set"),
    ]:
        with pytest.raises(StoreError, match=message):
            one.set(key, value)
    with pytest.raises(StoreError, match="taken"):
        _client(store, 1)
    one.close()
    two.close()


def test_store_marks_a_rank_gone_when_it_vanishes_or_goes_silent(store: StoreServer) -> None:
    watcher, vanishing, silent = _client(store, 0), _client(store, 1), _client(store, 2)
    vanishing.close()
    found = watcher.wait_any(["done/1", "gone/1"], 5)
    assert found is not None and found[0] == "gone/1"
    silent._stop.set()  # its pings stop, as a stopped process's would
    found = watcher.wait_any(["done/2", "gone/2"], 5)
    assert found is not None and found[0] == "gone/2"
    watcher.close()
    silent.close()


def test_interface_address() -> None:
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(RendezvousError, match="no IPv4 address"):
        interface_address("nosuchif0")
    with pytest.raises(RendezvousError, match="not a network interface name"):
        interface_address("x" * 40)


def test_a_master_stalling_mid_message_loses_only_its_own_session(server: WorkerServer) -> None:
    other = TcpTransport(server.address, "worker1", "other", timeout_s=5)
    other.publish("l0", torch.eye(2), LayerOp("linear"))
    sock = _raw_session(server)
    sock.sendall(Header(Op.STATS, 2).pack()[:40])  # and nothing more
    start = time.monotonic()
    assert sock.recv(1) == b""  # the worker ends it after its 2 s deadline
    assert 1.5 < time.monotonic() - start < 4
    torch.testing.assert_close(other.run("l0", torch.ones(1, 2)), torch.ones(1, 2))
    other.close()
    sock.close()
