"""The rendezvous: a data-only key-value store hosted by rank 0 at MASTER_ADDR:MASTER_PORT.

Hand-written rather than torch's `TCPStore` because that one listens on every interface and
cannot say that a rank went away. This one binds only the given address, holds short ASCII keys
and values of a fixed grammar, and knows each connection's rank: a rank whose connection closes,
or that stays silent past the deadline, before it recorded `done/<rank>` gets `gone/<rank>`.

    request  <4s B B H I>  magic "GCVS", version, op, item count, timeout (ms), then items
    reply    <4s B B H I>  the same header (op is a reply op, timeout 0), then items
    item     <H> length + that many bytes of printable ASCII (at most 128; at most 16 items)

Ops: JOIN [rank] -> OK; SET [key, value] -> OK (own keys only, write once); WAIT [keys...]
-> VALUE [key, value] for the first key present within the timeout, else NONE; PING -> OK.
Keys: role/N (master|worker), addr/N (host:port, workers), done/N (ok|failed), gone/N (set by the
store itself).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time

from groupcover.wire.sockets import Closed, Deadline, accept_forever, recv_exact, send_all

MAGIC = b"GCVS"
VERSION = 1
HEAD = struct.Struct("<4sBBHI")
ITEM = struct.Struct("<H")
MAX_ITEM = 128
MAX_ITEMS = 16
MAX_WAIT_MS = 60_000

JOIN, SET, WAIT, PING = 1, 2, 3, 4
OK, VALUE, NONE, ERR = 0x81, 0x82, 0x83, 0x8F

KEY = re.compile(r"(role|addr|done|gone)/(\d{1,6})")
VALUES = {
    "role": re.compile(r"master|worker"),
    "addr": re.compile(r"[0-9A-Fa-f.:\[\]]{2,60}:\d{1,5}"),
    "done": re.compile(r"ok|failed"),
}


class StoreError(Exception):
    """The store or its peer broke the protocol, or the connection ended."""


def _printable(data: bytes) -> str:
    if not all(32 <= b < 127 for b in data):
        raise StoreError("an item is not printable ASCII")
    return data.decode("ascii")


def _pack(op: int, items: list[str], timeout_ms: int = 0) -> bytes:
    parts = [HEAD.pack(MAGIC, VERSION, op, len(items), timeout_ms)]
    for item in items:
        data = item.encode("ascii")
        if len(data) > MAX_ITEM:
            raise StoreError(f"item {item[:20]!r}... is over {MAX_ITEM} bytes")
        parts += [ITEM.pack(len(data)), data]
    return b"".join(parts)


def _read(sock: socket.socket, deadline: float | None) -> tuple[int, int, list[str]]:
    """One message: (op, timeout_ms, items); never reads more than the bounded sizes."""
    head = bytearray(HEAD.size)
    try:
        recv_exact(sock, memoryview(head), deadline)
        magic, version, op, count, timeout_ms = HEAD.unpack(head)
        if magic != MAGIC or version != VERSION or count > MAX_ITEMS:
            raise StoreError("malformed store message")
        items = []
        for _ in range(count):
            size = bytearray(ITEM.size)
            recv_exact(sock, memoryview(size), deadline)
            (length,) = ITEM.unpack(size)
            if length > MAX_ITEM:
                raise StoreError("store item too long")
            data = bytearray(length)
            recv_exact(sock, memoryview(data), deadline)
            items.append(_printable(bytes(data)))
    except Deadline:
        raise StoreError("silent past the deadline") from None
    except Closed:
        raise StoreError("its connection closed") from None
    return op, timeout_ms, items


# ---- the server (rank 0) ---------------------------------------------------------------------


class StoreServer:
    """Listens on exactly `host:port`; a thread per connection (a world is a few ranks)."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._data: dict[str, str] = {}
        self._cond = threading.Condition()
        self._joined: set[int] = set()
        self._conns: list[socket.socket] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closing = False
        threading.Thread(target=self._accept, name="gc-store", daemon=True).start()

    def _accept(self) -> None:
        for conn in accept_forever(self._listener, lambda: self._closing, "rendezvous",
                                   "connection"):  # fmt: skip
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def snapshot(self) -> dict[str, str]:
        with self._cond:
            return dict(self._data)

    def _serve(self, conn: socket.socket) -> None:
        rank: int | None = None
        reason = "its connection closed"
        try:
            while True:
                try:
                    op, timeout_ms, items = _read(conn, time.monotonic() + self.timeout_s)
                except StoreError as exc:
                    reason = str(exc)
                    if "silent" in reason:
                        reason = f"silent for more than {self.timeout_s:g} s"
                    return
                if op == JOIN and rank is None and len(items) == 1 and items[0].isdigit():
                    candidate = int(items[0])
                    with self._cond:
                        taken = candidate in self._joined
                        if not taken and 0 <= candidate < self.world_size:
                            self._joined.add(candidate)
                            rank = candidate
                    if rank is None:
                        self._reply(conn, ERR, [f"rank {candidate} is taken or outside the world"])
                        return
                    self._reply(conn, OK, [])
                elif op == SET and rank is not None and len(items) == 2:
                    error = self._set(rank, items[0], items[1])
                    self._reply(conn, ERR if error else OK, [error] if error else [])
                elif op == WAIT and rank is not None and items and timeout_ms <= MAX_WAIT_MS:
                    if not all(KEY.fullmatch(key) for key in items):
                        self._reply(conn, ERR, ["bad key"])
                        continue
                    found = self._wait(items, timeout_ms / 1e3)
                    self._reply(conn, VALUE if found else NONE, list(found or ()))
                elif op == PING and rank is not None:
                    self._reply(conn, OK, [])
                else:
                    self._reply(conn, ERR, ["bad request"])
                    return
        except StoreError:
            reason = "it stopped reading"
        finally:
            with self._cond:
                if rank is not None and f"done/{rank}" not in self._data:
                    self._data.setdefault(f"gone/{rank}", reason)
                    self._cond.notify_all()
                with contextlib.suppress(ValueError):
                    self._conns.remove(conn)
                self._cond.notify_all()  # `linger` waits for the last one
            conn.close()

    def _set(self, rank: int, key: str, value: str) -> str:
        match = KEY.fullmatch(key)
        if match is None or match[1] == "gone" or int(match[2]) != rank:
            return f"rank {rank} may not set {key!r}"
        if not VALUES[match[1]].fullmatch(value):
            return f"bad value for {key!r}"
        with self._cond:
            if key in self._data:
                return f"{key!r} is already set"
            self._data[key] = value
            self._cond.notify_all()
        return ""

    def _wait(self, keys: list[str], timeout_s: float) -> tuple[str, str] | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for key in keys:
                    if key in self._data:
                        return key, self._data[key]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    return None
                self._cond.wait(remaining)

    def _reply(self, conn: socket.socket, op: int, items: list[str]) -> None:
        try:
            send_all(conn, [_pack(op, items)], time.monotonic() + self.timeout_s)
        except (Deadline, Closed):
            raise StoreError("cannot reply") from None

    def linger(self, seconds: float) -> None:
        """Waits (at most `seconds`) until every rank has closed its connection: a rank whose
        `done` was recorded may not have read the reply yet when the last one is recorded."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._conns:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._cond:
            self._cond.notify_all()
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


# ---- the client (every rank) -----------------------------------------------------------------


class StoreClient:
    """One rank's connection to the store, kept alive by a ping every `interval_s` (the thread
    sleeps in between: no spinning)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self.timeout_s = timeout_s
        self.interval_s = max(0.05, min(timeout_s / 4, 5.0))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pinger = threading.Thread(target=self._ping, name="gc-store-ping", daemon=True)
        self.local_address: str = sock.getsockname()[0]
        # while set, no call may end after it (a slow store cannot stretch an outer deadline)
        self.until: float | None = None

    @classmethod
    def connect(cls, host: str, port: int, deadline: float, timeout_s: float) -> StoreClient:
        """Retries until the store answers or the deadline passes (rank 0 may start last)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreError(f"no store at {host}:{port}")
            try:
                sock = socket.create_connection((host, port), timeout=min(remaining, 5.0))
            except OSError:
                time.sleep(min(0.1, max(remaining, 0)))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(sock, timeout_s)

    def _call(self, op: int, items: list[str], timeout_ms: int = 0,
              bounded: bool = True) -> tuple[int, list[str]]:  # fmt: skip
        with self._lock:
            deadline = time.monotonic() + self.timeout_s + timeout_ms / 1e3
            if bounded and self.until is not None:
                deadline = min(deadline, self.until)
            try:
                send_all(self._sock, [_pack(op, items, timeout_ms)], deadline)
            except (Deadline, Closed):
                raise StoreError("the store went away") from None
            reply, _, answer = _read(self._sock, deadline)
        if reply == ERR:
            raise StoreError(answer[0] if answer else "refused")
        return reply, answer

    def join(self, rank: int) -> None:
        self._call(JOIN, [str(rank)])
        self._pinger.start()

    def set(self, key: str, value: str) -> None:
        self._call(SET, [key, value])

    def wait_any(self, keys: list[str], timeout_s: float) -> tuple[str, str] | None:
        """The first of `keys` present within `timeout_s` (waits in the store, not here)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            chunk = min(remaining, self.interval_s)
            reply, items = self._call(WAIT, keys, int(chunk * 1e3))
            if reply == VALUE and len(items) == 2 and items[0] in keys:
                return items[0], items[1]
            if reply != NONE:
                raise StoreError("malformed WAIT reply")
            if remaining <= 0:
                return None

    def get(self, key: str) -> str | None:
        found = self.wait_any([key], 0)
        return None if found is None else found[1]

    def _ping(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._lock.acquire(blocking=False):  # a call in progress is a sign of life too
                self._lock.release()
                try:
                    self._call(PING, [], bounded=False)
                except StoreError:
                    return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
