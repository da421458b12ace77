"""The model key from a pod's Confidential Data Hub: against a fake CDH on 127.0.0.1 that
answers `GET /cdh/resource/<repo>/<type>/<tag>` as the real one does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from groupcover.errors import UsageError
from groupcover.keyrelease import cdh
from groupcover.keyrelease.kbs import KeyReleaseError, KeyReleaseRefused
from groupcover.package.keys import KeySource, obtain_key
from groupcover.package.seal import SealError

KEY = bytes(range(32))


class FakeCdh(BaseHTTPRequestHandler):
    resources: ClassVar[dict[str, bytes]] = {"/cdh/resource/gcvm/model/key": KEY,
                                   "/cdh/resource/gcvm/model/short": b"x"}  # fmt: skip
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = self.resources.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"resource not released: policy denied")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_cdh() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCdh)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeCdh.seen.clear()
    try:
        yield f"cdh://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_key_released_by_the_cdh_is_labelled_so(fake_cdh: str) -> None:
    release = obtain_key(KeySource(broker=fake_cdh))  # no --tee: the CDH attests
    assert release.key == KEY
    assert FakeCdh.seen == ["/cdh/resource/gcvm/model/key"]
    assert release.facts["source"] == "cdh"
    assert release.label == cdh.LABEL and "Confidential Data Hub" in release.label
    assert release.facts["attested"] is False  # this process saw no evidence


def test_a_refusal_carries_the_cdh_reason(fake_cdh: str) -> None:
    with pytest.raises(KeyReleaseRefused, match="HTTP 404 resource not released"):
        obtain_key(KeySource(broker=fake_cdh, resource="gcvm/model/other"))


def test_a_resource_that_is_not_a_key_is_refused(fake_cdh: str) -> None:
    with pytest.raises(SealError, match="1 bytes"):
        obtain_key(KeySource(broker=fake_cdh, resource="gcvm/model/short"))


def test_no_cdh_answering_is_one_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(KeyReleaseError, match="did not answer"):
        obtain_key(KeySource(broker=f"cdh://127.0.0.1:{port}"))


@pytest.mark.parametrize("url", ["cdh://10.0.0.1:8006", "cdh://example.com:8006",
                                 "cdh://127.0.0.1", "cdh://127.0.0.1:0"])  # fmt: skip
def test_only_loopback_endpoints(url: str) -> None:
    with pytest.raises(UsageError):
        KeySource(broker=url).validate()


@pytest.mark.parametrize("resource", ["gcvm/model", "a/b/c/d", "gcvm/../key", "gcvm/m odel/k"])
def test_resource_must_be_three_plain_segments(resource: str) -> None:
    with pytest.raises(UsageError):
        KeySource(broker="cdh://", resource=resource).validate()


def test_default_endpoint_is_the_pods_cdh() -> None:
    assert cdh.endpoint("cdh://") == ("127.0.0.1", 8006)
    assert cdh.resource_path("gcvm/model/key") == "/cdh/resource/gcvm/model/key"
