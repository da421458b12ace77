"""`gcvm broker serve`: the key broker over HTTP, on one address only (the protocol core, with
its endpoints, evidence and errors, is `orchestrator.attest.kbs`).

    POST /kbs/v0/auth, POST /kbs/v0/attest, GET /kbs/v0/resource/<repository>/<type>/<tag>

A refused request gets Trustee's ErrorInformation JSON with its status; a bug in a handler gets a
500, never the server's end. The session is the `kbs-session-id` cookie.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.attest.kbs import (
    ERROR_TYPE_PREFIX,
    INSECURE_LABEL,
    MAX_BODY,
    SESSION_COOKIE,
    Broker,
    Refusal,
    Session,
    log,
)
from orchestrator.errors import GcvmError

__all__ = ["INSECURE_LABEL", "Broker", "make_server", "serve_in_thread"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    broker: Broker


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request
    server_version = "gcvm-broker"

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
        if length is None or not length.isdigit():
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "InvalidRequest", "Content-Length required")
        if int(length) > MAX_BODY:
            raise Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "InvalidRequest", "request body too large"
            )
        return self.rfile.read(int(length))

    def _handle(self, fn: Callable[[], tuple[int, dict[str, Any], Session | None]]) -> None:
        try:
            status, body, session = fn()
        except Refusal as exc:
            if exc.status in (HTTPStatus.LENGTH_REQUIRED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                self.close_connection = True
            self._send(exc.status, exc.body())
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


def make_server(broker: Broker, host: str, port: int) -> _Server:
    """An HTTP server bound to `host:port` only (port 0: any free port)."""
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise GcvmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server.broker = broker
    return server


def serve_in_thread(broker: Broker, host: str = "127.0.0.1", port: int = 0) -> _Server:
    server = make_server(broker, host, port)
    threading.Thread(target=server.serve_forever, name="gcvm-broker", daemon=True).start()
    return server
