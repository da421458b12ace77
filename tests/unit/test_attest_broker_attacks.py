"""Unauthenticated peers against the key broker, over loopback only: what they can make the broker
hold (nothing before evidence verifies), how long they can hold a thread (a whole-request
deadline, a connection cap), and what malformed input gets (a 400 and one log line, never a
traceback)."""

from __future__ import annotations

import json

from groupcover.keyrelease import KbsClient
from orchestrator.attest import kbs

# the fixtures world and chain (a parameter of the same name is their use: noqa F811)
from tests.unit.test_attest_broker import (  # noqa: F401
    MODEL_KEY,
    RESOURCE,
    chain,
    tsm,
    world,
)

AUTH = json.dumps({"version": "0.1.1", "tee": "snp", "extra-params": ""}).encode()


def test_an_auth_flood_holds_no_state_and_a_guest_still_gets_its_key(world, chain) -> None:  # noqa: F811
    broker = world["broker"]
    for _ in range(kbs.MAX_SESSIONS + 1000):  # more challenges than any table would hold
        broker.auth(AUTH, "127.0.0.1")
    assert not broker._sessions  # an unauthenticated peer leaves nothing behind
    release = KbsClient(world["url"], tsm(world["tmp"], chain), timeout=10).get_resource(RESOURCE)
    assert release.secret == MODEL_KEY and release.attested


def test_a_forged_or_altered_challenge_is_no_session(world) -> None:  # noqa: F811
    from tests.unit.test_attest_broker import auth, post

    _, cookie = auth(world["url"])
    name, token = cookie.split("=", 1)
    altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for value in (altered, "x" * 98, token + "A"):
        status, error, _ = post(world["url"], "/kbs/v0/attest", {}, f"{name}={value}")
        assert status == 401 and error["detail"].startswith("no such session"), error
    assert not world["broker"]._sessions and not world["broker"]._challenges._consumed
