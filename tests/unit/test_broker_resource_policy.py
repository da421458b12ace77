"""A resource goes only to the measurements it is bound to: a policy's `resources` entry
`{file, measurements}`, or a repository key's `.<tag>.measurements` beside it. An attested guest
with another measurement (a guest the policy accepts, running another image) gets a 403 naming
resource and measurement; a resource without a list goes to any measurement the policy accepts,
as before. Real SNP reports from the test chain, over loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from groupcover.keyrelease import KbsClient, KeyReleaseRefused, NoEvidence
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from orchestrator.errors import UsageError
from tests.unit import test_attest_broker as base
from tests.unit.attest_testchain import GOOD_MEASUREMENT, TCB, SnpTestChain
from tests.unit.test_attest_broker import MODEL_KEY, tsm

chain = base.chain
OTHER = bytes(48).hex()  # a measurement the policy accepts too: another image of the owner's
GOOD = GOOD_MEASUREMENT.hex()


@pytest.fixture
def broker_url(tmp_path: Path, chain: SnpTestChain):
    chain.write(tmp_path)
    for name in ("free.key", "mine.key", "theirs.key", "nobody.key"):
        (tmp_path / name).write_bytes(MODEL_KEY)
        (tmp_path / name).chmod(0o600)
    repo = tmp_path / "repository" / "gcvm"
    for tag, allowed in (("open", None), ("bound", f"# the owner's image\n{GOOD}\n"),
                         ("elsewhere", f"{OTHER}\n"), ("garbled", "not hex\n")):  # fmt: skip
        (repo / tag).mkdir(parents=True)
        (repo / tag / "key").write_bytes(MODEL_KEY)
        (repo / tag / "key").chmod(0o600)
        if allowed is not None:
            (repo / tag / ".key.measurements").write_text(allowed)
    policy = parse_policy(
        {
            "snp": {"measurements": [GOOD, OTHER], "min_tcb": dict(TCB), "vmpl": [0],
                    "certs": "certs", "roots": "roots.pem"},
            "resources": {
                "gcvm/free/key": "free.key",  # no list: any accepted measurement
                "gcvm/mine/key": {"file": "mine.key", "measurements": [GOOD.upper()]},
                "gcvm/theirs/key": {"file": "theirs.key", "measurements": [OTHER]},
                "gcvm/nobody/key": {"file": "nobody.key", "measurements": []},
            },
        },
        tmp_path,
    )  # fmt: skip
    broker = Broker(policy, repository=tmp_path / "repository", insecure_no_attestation=True)
    server = serve_in_thread(broker, "127.0.0.1", 0)
    try:
        yield server.url, tmp_path
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str, source, name: str) -> bytes:
    return KbsClient(url, source, timeout=10).get_resource(name).secret


@pytest.mark.parametrize("name", ["gcvm/free/key", "gcvm/mine/key", "gcvm/open/key",
                                  "gcvm/bound/key"])  # fmt: skip
def test_a_resource_goes_to_a_measurement_it_allows(broker_url, chain, name) -> None:
    url, tmp = broker_url
    assert _get(url, tsm(tmp, chain), name) == MODEL_KEY


@pytest.mark.parametrize("name", ["gcvm/theirs/key", "gcvm/nobody/key", "gcvm/elsewhere/key"])
def test_a_resource_bound_elsewhere_is_refused_to_this_measurement(broker_url, chain, name):
    url, tmp = broker_url
    with pytest.raises(KeyReleaseRefused, match=r"\(403\)") as refused:
        _get(url, tsm(tmp, chain), name)
    assert f"policy denies resource {name} to measurement {GOOD}" in refused.value.message


def test_the_other_image_gets_its_own_resource_and_not_mine(broker_url, chain) -> None:
    url, tmp = broker_url
    assert _get(url, tsm(tmp, chain, measurement=bytes(48)), "gcvm/theirs/key") == MODEL_KEY
    with pytest.raises(KeyReleaseRefused, match=f"policy denies resource gcvm/mine/key to "
                       f"measurement {OTHER}"):  # fmt: skip
        _get(url, tsm(tmp, chain, measurement=bytes(48)), "gcvm/mine/key")


def test_a_measurement_list_that_does_not_parse_releases_to_nobody(broker_url, chain) -> None:
    url, tmp = broker_url
    with pytest.raises(KeyReleaseRefused, match="not hex"):
        _get(url, tsm(tmp, chain), "gcvm/garbled/key")


def test_a_guest_without_attestation_gets_no_bound_resource(broker_url) -> None:
    url, _ = broker_url
    assert _get(url, NoEvidence(), "gcvm/free/key") == MODEL_KEY  # the insecure mode, as before
    with pytest.raises(KeyReleaseRefused, match="no attested measurement"):
        _get(url, NoEvidence(), "gcvm/mine/key")


def test_the_sidecar_is_not_itself_a_resource(broker_url, chain) -> None:
    url, tmp = broker_url
    with pytest.raises(KeyReleaseRefused, match="no resource"):
        _get(url, tsm(tmp, chain), "gcvm/bound/.key.measurements")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file": "k", "measurements": ["00"]}, "expected 48"),
        ({"file": "k", "measurement": []}, "unknown key"),
        ({"measurements": []}, "names no file"),
    ],
)
def test_resource_entries_are_checked_on_load(tmp_path, entry, message) -> None:
    with pytest.raises(UsageError, match=message):
        parse_policy({"resources": {"gcvm/model/key": entry}}, tmp_path)
