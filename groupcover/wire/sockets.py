"""The wire's byte layer: whole messages over a blocking TCP socket, under a deadline.

Both ends use it: the master's transport (`wire.client`, in the TEE), the worker's server
(`wire.server`) and the rendezvous store (`wire.store`). It knows nothing of the schema: it moves
exactly the bytes it is given or asked for, or raises `Deadline` / `Closed`.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence

ACCEPT_RETRY_S = 0.05  # after accept() failed (out of descriptors): no spinning


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Deadline(Exception):
    """The deadline passed before the whole message moved."""


class Closed(Exception):
    """The peer closed the connection (or it failed) mid-message."""


def _kernel_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """A deadline the kernel enforces on a blocking socket (0: none). Blocking calls with
    MSG_WAITALL wake this thread once per message, not once per segment and poll."""
    if sock.gettimeout() is not None:
        sock.settimeout(None)  # blocking mode: Python adds no poll() of its own
    whole = 0.0 if seconds is None else max(seconds, 1e-3)
    sock.setsockopt(socket.SOL_SOCKET, option,
                    struct.pack("ll", int(whole), int((whole % 1) * 1e6)))  # fmt: skip


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fills `view` from `sock`, never reading past it; `Deadline` / `Closed` on failure."""
    got, size = 0, len(view)
    while got < size:
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Deadline
        _kernel_timeout(sock, socket.SO_RCVTIMEO, remaining)
        try:
            n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError):
            continue  # the kernel's timeout: the loop checks the deadline
        except OSError as exc:
            raise Closed(exc.strerror or type(exc).__name__) from None
        if n == 0:
            raise Closed("connection closed")
        got += n


def send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview], deadline: float) -> None:
    """One `sendmsg` of every buffer (header and tensor bytes, no copy), resumed if partial."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Deadline
        _kernel_timeout(sock, socket.SO_SNDTIMEO, remaining)
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, TimeoutError):
            continue
        except OSError as exc:
            raise Closed(exc.strerror or type(exc).__name__) from None
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


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
