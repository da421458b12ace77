"""Attestation latency on this machine (median of N, one process, loopback): SNP and TDX
verification of the real vectors, and a whole key release through the broker (auth, evidence
from the configfs-tsm fake, attest, JWE resource).
Run: .venv/bin/python -m tests.unit.attest_latency
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from groupcover.keyrelease import ConfigfsTsm, KbsClient
from orchestrator.attest import snp, tdx
from orchestrator.attest.broker import serve_in_thread
from orchestrator.attest.kbs import Broker
from orchestrator.attest.policy import parse_policy
from tests.unit.attest_testchain import GOOD_MEASUREMENT, FakeTsm, SnpTestChain

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "attestation"


def median_ms(fn: Callable[[], object], n: int = 50) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    report = snp.read_report_file(FIX / "snp" / "virtee-report-milan-v2.hex")
    certs = snp.SnpCerts.load_dir(FIX / "snp")
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ms = median_ms(lambda: snp.verify_report(report, certs, now=when))
    print(f"snp verify, real vector (signature, chain, TCB, chip id): {ms:.2f} ms")
    quote = (FIX / "tdx" / "dcapqvl-tdx-quote-v4.bin").read_bytes()
    collateral = tdx.read_collateral(FIX / "tdx" / "dcapqvl-tdx-quote-v4.collateral.json")
    ms = median_ms(lambda: tdx.verify_quote(quote, collateral, now=1750331763))
    print(f"tdx verify, real vector (dcap-qvl with collateral):       {ms:.2f} ms")
    tmp = Path(tempfile.mkdtemp())
    chain = SnpTestChain.make()
    chain.write(tmp)
    (tmp / "k").write_bytes(b"k" * 32)
    policy = parse_policy(
        {
            "snp": {"measurements": [GOOD_MEASUREMENT.hex()], "roots": "roots.pem"},
            "resources": {"gcvm/model/key": "k"},
        },
        tmp,
    )
    server = serve_in_thread(Broker(policy), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def release() -> None:
        fake = FakeTsm(tmp / "tsm", "sev_guest", chain.report, chain.cert_table())
        source = ConfigfsTsm(root=tmp / "tsm", fs=fake, tee="snp")
        assert KbsClient(url, source).get_resource("gcvm/model/key").secret == b"k" * 32

    try:
        ms = median_ms(release, 30)
    finally:
        server.shutdown()
        server.server_close()
    print(f"key release over loopback (auth, evidence, attest, JWE):  {ms:.2f} ms")


if __name__ == "__main__":
    main()
