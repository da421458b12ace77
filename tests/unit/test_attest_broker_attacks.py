"""Unauthenticated peers against the key broker, over loopback only: what they can make the broker
hold (nothing before evidence verifies), how long they can hold a thread (a whole-request
deadline, a connection cap), and what malformed input gets (a 400 and one log line, never a
traceback)."""

from __future__ import annotations

import base64
import json
import select
import socket
import threading
import time

import pytest

from groupcover.keyrelease import KbsClient
from orchestrator.attest import kbs
from orchestrator.attest.broker import make_server, serve_in_thread
from tests.unit import test_attest_broker as base
from tests.unit.test_attest_broker import MODEL_KEY, RESOURCE, tsm

chain = base.chain  # the fixtures, shared with the protocol's own tests
world = base.world

AUTH = json.dumps({"version": "0.1.1", "tee": "snp", "extra-params": ""}).encode()


def test_an_auth_flood_holds_no_state_and_a_guest_still_gets_its_key(world, chain) -> None:
    broker = world["broker"]
    for _ in range(kbs.MAX_SESSIONS + 1000):  # more challenges than any table would hold
        broker.auth(AUTH, "127.0.0.1")
    assert not broker._sessions  # an unauthenticated peer leaves nothing behind
    client = KbsClient(
        world["tls_url"], tsm(world["tmp"], chain), world["pin"], timeout=10, clock=world["clock"]
    )
    release = client.get_resource(RESOURCE)
    assert release.secret == MODEL_KEY and release.attested


def test_a_forged_or_altered_challenge_is_no_session(world) -> None:
    from tests.unit.test_attest_broker import auth, post

    _, cookie = auth(world["url"])
    name, token = cookie.split("=", 1)
    altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for value in (altered, "x" * 98, token + "A"):
        status, error, _ = post(world["url"], "/kbs/v0/attest", {}, f"{name}={value}")
        assert status == 401 and error["detail"].startswith("no such session"), error
    assert not world["broker"]._sessions and not world["broker"]._challenges._consumed


# --- slow and many connections ----------------------------------------------------------------


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(4096) == b""  # a 503 or 408 still means it was cut: read again later
    except OSError:
        return True


def test_slow_clients_are_cut_at_the_deadline_and_a_guest_gets_through(
    world,
    chain,
    capfd,
) -> None:
    server = serve_in_thread(world["broker"], "127.0.0.1", 0)
    server.request_deadline_s = 2.0
    url = f"http://127.0.0.1:{server.server_address[1]}"
    head = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: b\r\nContent-Length: 64\r\n\r\n" + b"{" * 64
    slow = [socket.create_connection(server.server_address, timeout=5) for _ in range(6)]
    start = time.monotonic()
    cut: dict[int, float] = {}
    try:
        for second in range(8):  # one byte a second on each socket, never finishing
            for i, sock in enumerate(slow):
                if i in cut:
                    continue
                if _closed(sock):
                    cut[i] = time.monotonic() - start
                    continue
                try:
                    sock.send(head[second : second + 1])
                except OSError:
                    cut[i] = time.monotonic() - start
            if second == 1:  # meanwhile a genuine guest gets its key
                release = KbsClient(url, tsm(world["tmp"], chain), timeout=10).get_resource(
                    RESOURCE
                )
                assert release.secret == MODEL_KEY
            if len(cut) == len(slow):
                break
            time.sleep(1)
    finally:
        for sock in slow:
            sock.close()
        server.shutdown()
        server.server_close()
    assert len(cut) == len(slow), f"slow clients still connected after 8 s: cut {cut}"
    assert max(cut.values()) < 2.0 + 3.0  # the deadline, and the test's one-second steps
    assert "Traceback" not in capfd.readouterr().err


def test_connections_beyond_the_cap_are_refused_and_threads_stay_bounded(
    world,
    chain,
    capfd,
) -> None:
    server = make_server(world["broker"], "127.0.0.1", 0, max_connections=4)
    server.request_deadline_s = 2.0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    before = threading.active_count()
    held = [socket.create_connection(server.server_address, timeout=5) for _ in range(4)]
    extra = [socket.create_connection(server.server_address, timeout=5) for _ in range(20)]
    try:
        time.sleep(0.5)
        assert threading.active_count() <= before + 4
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not all(_closed(s) for s in extra):
            time.sleep(0.2)  # refused at once or after a brief wait, never served
        assert all(_closed(s) for s in extra)
        time.sleep(2.5)  # the held ones reach their deadline: their slots come back
        release = KbsClient(url, tsm(world["tmp"], chain), timeout=10).get_resource(RESOURCE)
        assert release.secret == MODEL_KEY
    finally:
        for sock in held + extra:
            sock.close()
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err


# --- malformed input: a 400 and one line, never a 500 or a traceback ---------------------------


def _raw(url: str, head: bytes, body: bytes = b"") -> int:
    """Send bytes as they are (no client library would send these) and return the status."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("length", "body"),
    [
        ("²".encode("latin-1"), b""),  # str.isdigit() says yes, int() says no
        (b"9" * 5000, b""),  # more digits than int() converts
        (str(200_000 * 2).encode(), b"[" * 200_000 + b"]" * 200_000),  # nested 200,000 deep
    ],
    ids=["unicode-digit", "5000-digits", "deep-json"],
)
def test_malformed_requests_get_a_400_without_a_traceback(world, length, body, capfd) -> None:
    head = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: b\r\nContent-Length: " + length + b"\r\n\r\n"
    assert _raw(world["url"], head, body) == 400
    assert "Traceback" not in capfd.readouterr().err


def test_a_tee_pubkey_off_its_curve_is_refused_at_attest(world, chain) -> None:
    from groupcover.keyrelease import report_data_for
    from groupcover.keyrelease.jwe import EphemeralKey
    from tests.unit.test_attest_broker import auth, post

    nonce, cookie = auth(world["url"])
    pubkey = EphemeralKey().public_jwk
    y = int.from_bytes(base64.urlsafe_b64decode(pubkey["y"] + "=="), "big") ^ 1
    pubkey["y"] = base64.urlsafe_b64encode(y.to_bytes(32, "big")).rstrip(b"=").decode()
    report = chain.report(report_data_for(nonce, pubkey))  # genuine evidence for a bad key
    body = {
        "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
        "tee-evidence": {"attestation_report": base64.b64encode(report).decode()},
    }
    status, error, _ = post(world["url"], "/kbs/v0/attest", body, cookie)
    assert status == 400 and "not on the curve" in error["detail"], error


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nonce_ttl_s": float("nan")}, "nonce_ttl_s must be a positive number"),
        ({"nonce_ttl_s": "soon"}, "nonce_ttl_s must be a positive number"),
        ({"token_ttl_s": -1}, "token_ttl_s must be a positive number"),
        ({"snp": {"vmpl": None}}, "snp.vmpl must be a list"),
        ({"snp": {"vmpl": 0}}, "snp.vmpl must be a list"),
        ({"snp": {"vmpl": [7]}}, "snp.vmpl must be a list"),
        ({"snp": {"min_tcb": {"tee": "x"}}}, "snp.min_tcb.tee must be an integer"),
        ({"snp": "yes"}, "snp must be a mapping"),
        ({"snp": {"measurements": [1]}}, "snp.measurements"),
        ({"tdx": {"accepted_tcb_status": 5}}, "tdx.accepted_tcb_status must be a list"),
        ({"tdx": {"rtmrs": "x"}}, "tdx.rtmrs must be a list"),
        ({"resources": ["a/b/c"]}, "resources must be a mapping"),
        ({"snp": {"certs": 5}}, "snp.certs must be a path"),
    ],
)
def test_policy_values_of_the_wrong_type_are_usage_errors(tmp_path, data, message) -> None:
    from orchestrator.attest.policy import parse_policy
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError) as info:
        parse_policy(data, tmp_path)
    assert message in info.value.message


def test_broker_serve_exits_2_on_a_bad_policy(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "policy.yaml").write_text("nonce_ttl_s: .nan\n")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "broker", "serve", "--listen", "127.0.0.1:0",
         "--policy", str(tmp_path / "policy.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "nonce_ttl_s" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
