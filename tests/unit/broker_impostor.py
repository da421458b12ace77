"""What the untrusted host can run in the broker's place (it owns the network path): a KBS
look-alike that verifies nothing, signs nothing and releases a key of its own, wrapped to the
guest's tee-pubkey exactly as the genuine broker would. It answers plain HTTP, or TLS with a
certificate of its own (or, to test the token checks, the genuine broker's identity), and records
every request it saw."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.attest.kbs import _jwe

IMPOSTOR_KEY = b"\x66" * 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    """The red team's token: claims of a verified SNP attestation, `alg: none`, no signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def lying_claims(pubkey: dict[str, Any], exp: int = 2**31 - 1) -> dict[str, Any]:
    return {"iss": "gcvm-broker", "exp": exp, "tee": "snp", "tee-pubkey": pubkey,
            "attestation": "verified", "evaluation": {"measurement": "00" * 48}}  # fmt: skip


class Impostor:
    """Start with `with Impostor(...) as imp:`; `imp.url`, `imp.seen` (method, path, body)."""

    def __init__(
        self,
        tls: tuple[str, str] | None = None,  # (certfile, keyfile) it presents
        token: Callable[[dict[str, Any]], str] | None = None,  # pubkey -> token it answers
    ) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.token = token or (lambda pubkey: unsigned_token(lying_claims(pubkey)))
        self.tls = tls
        imp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Set-Cookie", "kbs-session-id=impostor; Path=/kbs")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                imp.seen.append(("POST", self.path, body))
                if self.path.endswith("/auth"):
                    self._answer(200, {"nonce": secrets.token_urlsafe(32), "extra-params": ""})
                    return
                pubkey = json.loads(body)["runtime-data"]["tee-pubkey"]
                imp.pubkey = pubkey
                self._answer(200, {"token": imp.token(pubkey)})

            def do_GET(self) -> None:
                imp.seen.append(("GET", self.path, b""))
                self._answer(200, _jwe(IMPOSTOR_KEY, imp.pubkey))

        self.pubkey: dict[str, Any] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Impostor:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
