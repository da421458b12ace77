"""`gcvm broker serve`: the key broker over HTTPS (or, without an identity, plain HTTP: an
unauthenticated demo or test broker), on one address only (the protocol core, with
its endpoints, evidence and errors, is `orchestrator.attest.kbs`).

    POST /kbs/v0/auth, POST /kbs/v0/attest, GET /kbs/v0/resource/<repository>/<type>/<tag>

A refused request gets Trustee's ErrorInformation JSON with its status; a bug in a handler gets a
500, never the server's end. The session is the `kbs-session-id` cookie.

Limits against slow or many clients: a request (its line, headers and body) must arrive within
`REQUEST_DEADLINE_S` of the server starting to wait for it, whatever the pace of its bytes; at most
`MAX_CONNECTIONS` connections are served at once (one thread each), a connection beyond waits
`QUEUE_WAIT_S` for a slot and is then refused with a 503. A client that goes away or runs out of
time costs one log line, never a traceback.
"""

from __future__ import annotations

import io
import json
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.attest.identity import Identity
from orchestrator.attest.kbs import (
    INSECURE_LABEL,
    MAX_BODY,
    SESSION_COOKIE,
    Broker,
    Session,
    log,
)
from orchestrator.attest.request import ERROR_TYPE_PREFIX, Refusal
from orchestrator.errors import GcvmError

__all__ = ["INSECURE_LABEL", "Broker", "make_server", "serve_in_thread"]


REQUEST_DEADLINE_S = 10.0  # request line + headers + body, in all
MAX_CONNECTIONS = 64  # served at once, one thread each
QUEUE_WAIT_S = 0.5  # how long a connection beyond the cap waits for a slot
WRITE_TIMEOUT_S = 10.0  # per send of an answer
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\n"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    broker: Broker
    request_deadline_s = REQUEST_DEADLINE_S

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler] | None = None,
        bind_and_activate: bool = True,
        max_connections: int = MAX_CONNECTIONS,
        identity: Identity | None = None,
    ) -> None:
        super().__init__(address, handler or _Handler, bind_and_activate)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.identity = identity
        self.tls = identity.ssl_context() if identity is not None else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=QUEUE_WAIT_S):
            log.warning("connection from %s refused: every connection slot is busy",
                        client_address[0])  # fmt: skip
            try:
                if self.tls is None:  # a TLS client would read these bytes as garbage
                    request.setblocking(False)
                    request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, no traceback: a client that went away or ran out of time is routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("connection from %s ended: %s", client_address[0], type(exc).__name__)
        else:
            log.error("connection from %s failed: %s: %s", client_address[0],
                      type(exc).__name__, str(exc)[:200])  # fmt: skip


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, each read bounded by what is left of the request's deadline."""

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(WRITE_TIMEOUT_S)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = WRITE_TIMEOUT_S  # the socket's timeout between reads (a read sets its own)
    server_version = "gcvm-broker"
    deadline = 0.0  # time.monotonic() by which the current request must have arrived

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = _handshake(
                self.server.tls, self.request, time.monotonic() + self.server.request_deadline_s
            )
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if isinstance(self.connection, ssl.SSLSocket):  # the server closes the plain one
                self.connection.close()

    def handle_one_request(self) -> None:
        self.deadline = time.monotonic() + self.server.request_deadline_s
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _session_id(self) -> str | None:
        header = self.headers.get("Cookie")
        if not header:
            return None
        try:
            cookie = SimpleCookie(header)
        except CookieError:
            return None
        morsel = cookie.get(SESSION_COOKIE)
        return morsel.value if morsel else None

    def _send(self, status: int, body: dict[str, Any], session: Session | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if session is not None:
            ttl = int(max(self.server.broker.policy.token_ttl_s, 1))
            self.send_header(
                "Set-Cookie", f"{SESSION_COOKIE}={session.id}; Path=/kbs; Max-Age={ttl}; HttpOnly"
            )
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "InvalidRequest", "Content-Length required")
        if not (length.isascii() and length.isdigit() and len(length) <= 12):
            raise Refusal(HTTPStatus.BAD_REQUEST, "InvalidRequest", "Content-Length is malformed")
        if int(length) > MAX_BODY:
            raise Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "InvalidRequest", "request body too large"
            )
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise ConnectionError("the client closed before sending its whole body")
        return body

    def _handle(self, fn: Callable[[], tuple[int, dict[str, Any], Session | None]]) -> None:
        try:
            status, body, session = fn()
        except Refusal as exc:
            if exc.status in (411, 413) or exc.detail.startswith("Content-Length"):
                self.close_connection = True
            self._send(exc.status, exc.body())
            return
        except (TimeoutError, ConnectionError) as exc:  # the client's doing: drop it, quietly
            log.info("request from %s dropped: %s", self.client_address[0], exc)
            self.close_connection = True
            return
        except Exception as exc:  # a bug must not kill the server; the client gets a 500
            log.exception("internal error")
            self._send(500, {"type": f"{ERROR_TYPE_PREFIX}/Internal", "detail": str(exc)[:200]})
            return
        self._send(status, body, session)

    def do_POST(self) -> None:
        broker = self.server.broker

        def run() -> tuple[int, dict[str, Any], Session | None]:
            body = self._body()
            if self.path == "/kbs/v0/auth":
                session, challenge = broker.auth(body, self.client_address[0])
                return 200, challenge, session
            if self.path == "/kbs/v0/attest":
                session, token = broker.attest(self._session_id(), body, self.client_address[0])
                return 200, token, session
            raise Refusal(HTTPStatus.NOT_FOUND, "InvalidRequestPath", f"no POST {self.path}")

        self._handle(run)

    def do_GET(self) -> None:
        broker = self.server.broker

        def run() -> tuple[int, dict[str, Any], Session | None]:
            prefix = "/kbs/v0/resource/"
            if not self.path.startswith(prefix):
                raise Refusal(HTTPStatus.NOT_FOUND, "InvalidRequestPath", f"no GET {self.path}")
            auth = self.headers.get("Authorization", "")
            bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            name = self.path[len(prefix) :]
            peer = self.client_address[0]
            return 200, broker.resource(self._session_id(), bearer, name, peer), None

        self._handle(run)


def _handshake(context: ssl.SSLContext, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
    """The TLS handshake of one connection, done by `deadline` however the client paces its
    bytes (a socket timeout would bound each read, not the whole)."""
    conn = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        conn.setblocking(False)
        wanted: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]]
        while True:
            try:
                conn.do_handshake()
                break
            except ssl.SSLWantReadError:
                wanted = ([conn], [])
            except ssl.SSLWantWriteError:
                wanted = ([], [conn])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*wanted, [], left)[:2]):
                raise TimeoutError("no TLS handshake within the request's deadline")
        conn.settimeout(WRITE_TIMEOUT_S)
    except BaseException:
        conn.close()
        raise
    return conn


def make_server(
    broker: Broker,
    host: str,
    port: int,
    max_connections: int = MAX_CONNECTIONS,
    identity: Identity | None = None,
) -> _Server:
    """A server bound to `host:port` only (port 0: any free port): HTTPS with the broker's
    identity, plain HTTP (unauthenticated) without."""
    try:
        server = _Server((host, port), max_connections=max_connections, identity=identity)
    except OSError as exc:
        raise GcvmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server.broker = broker
    return server


def serve_in_thread(
    broker: Broker, host: str = "127.0.0.1", port: int = 0, identity: Identity | None = None
) -> _Server:
    server = make_server(broker, host, port, identity=identity)
    threading.Thread(target=server.serve_forever, name="gcvm-broker", daemon=True).start()
    return server
