"""Intel TDX quotes (DCAP v4/v5): parse the TD report, verify with `dcap-qvl` offline.

The quote's signature, its PCK chain to Intel's SGX root, the QE identity and the platform's TCB
level are checked by dcap-qvl against collateral (TCB info, QE identity, CRLs) stored in a file
(`QuoteCollateralV3` JSON, as dcap-qvl and a PCCS return it) at a given time. This module reads
the TD report itself (MRTD, RTMRs, TD attributes, report data) so that a quote parses without
collateral, and checks debug and the TCB status.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.attest.common import BadEvidence, Verdict

HEADER_SIZE = 48
TD_REPORT10_SIZE = 584
TEE_TYPE_TDX = 0x81
TD_ATTR_DEBUG = 1 << 0

# A function (quote, collateral JSON, now) -> (TCB status, advisory ids); raises ValueError
QuoteVerifier = Callable[[bytes, str, int], tuple[str, list[str]]]


@dataclass(frozen=True)
class TdQuote:
    version: int
    att_key_type: int
    tee_type: int
    body_type: int  # 2: TD report 1.0, 3: TD report 1.5 (v5 only)
    tee_tcb_svn: bytes
    mr_seam: bytes
    td_attributes: int
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes & TD_ATTR_DEBUG)


def parse_quote(raw: bytes) -> TdQuote:
    if len(raw) < HEADER_SIZE:
        raise BadEvidence(
            f"a TDX quote starts with a {HEADER_SIZE}-byte header; this has {len(raw)}"
        )
    version, att_key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
    if tee_type != TEE_TYPE_TDX:
        raise BadEvidence(f"quote TEE type 0x{tee_type:x} is not TDX (0x81)")
    if version == 4:
        body, body_type = HEADER_SIZE, 2
    elif version == 5:
        if len(raw) < HEADER_SIZE + 6:
            raise BadEvidence("TDX quote v5 truncated in its body descriptor")
        body_type, _size = struct.unpack_from("<HI", raw, HEADER_SIZE)
        if body_type not in (2, 3):
            raise BadEvidence(f"TDX quote v5 body type {body_type} is not a TD report")
        body = HEADER_SIZE + 6
    else:
        raise BadEvidence(f"TDX quote version {version} is not supported (4 or 5)")
    if len(raw) < body + TD_REPORT10_SIZE + 4:
        raise BadEvidence(f"TDX quote truncated: {len(raw)} bytes")
    b = lambda off, n: raw[body + off : body + off + n]  # noqa: E731
    return TdQuote(
        version=version,
        att_key_type=att_key_type,
        tee_type=tee_type,
        body_type=body_type,
        tee_tcb_svn=b(0, 16),
        mr_seam=b(16, 48),
        td_attributes=struct.unpack_from("<Q", raw, body + 120)[0],
        xfam=b(128, 8),
        mr_td=b(136, 48),
        mr_config_id=b(184, 48),
        mr_owner=b(232, 48),
        mr_owner_config=b(280, 48),
        rtmrs=(b(328, 48), b(376, 48), b(424, 48), b(472, 48)),
        report_data=b(520, 64),
    )


def dcap_qvl_verifier(quote: bytes, collateral: str, now: int) -> tuple[str, list[str]]:
    """The real quote verification: dcap-qvl (signature, PCK chain, CRLs, QE identity, TCB)."""
    import dcap_qvl

    try:
        parsed = dcap_qvl.QuoteCollateralV3.from_json(collateral)
    except Exception as exc:  # the binding raises ValueError or its own error types
        raise BadEvidence(f"collateral is not dcap-qvl QuoteCollateralV3 JSON ({exc})") from None
    report = dcap_qvl.verify(quote, parsed, now)
    return str(report.status), [str(a) for a in report.advisory_ids]


def read_collateral(path: Path) -> str:
    try:
        text = path.read_text()
        json.loads(text)
    except OSError as exc:
        raise BadEvidence(f"cannot read collateral {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise BadEvidence(f"collateral {path} is not JSON") from None
    return text


def verify_quote(
    raw: bytes,
    collateral: str | None,
    *,
    now: int | None = None,
    accepted_status: tuple[str, ...] = ("UpToDate",),
    verifier: QuoteVerifier = dcap_qvl_verifier,
) -> Verdict:
    """Parse and (with collateral) verify one quote; debug TDs are refused."""
    quote = parse_quote(raw)
    verdict = Verdict("tdx", claims_of(quote))
    if quote.debug:
        verdict.fail("TD attributes have DEBUG set: the TD's memory is not private")
    if collateral is None:
        verdict.fail("quote parsed but not verified: no collateral (give --collateral)")
        return verdict
    try:
        status, advisories = verifier(raw, collateral, int(time.time()) if now is None else now)
    except ValueError as exc:
        verdict.fail(f"quote verification failed: {_one_line(exc)}")
        return verdict
    verdict.claims["tcb_status"] = status
    verdict.claims["advisory_ids"] = advisories
    verdict.verified.append("quote signature, PCK chain, CRLs and QE identity (dcap-qvl)")
    if status not in accepted_status:
        verdict.fail(f"TCB status {status} is not accepted ({', '.join(accepted_status)})")
    return verdict


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " / ".join(lines) if lines else type(exc).__name__


def claims_of(quote: TdQuote) -> dict[str, Any]:
    return {
        "quote_version": quote.version,
        "td_report": "1.5" if quote.body_type == 3 else "1.0",
        "mr_td": quote.mr_td.hex(),
        "rtmr_0": quote.rtmrs[0].hex(),
        "rtmr_1": quote.rtmrs[1].hex(),
        "rtmr_2": quote.rtmrs[2].hex(),
        "rtmr_3": quote.rtmrs[3].hex(),
        "td_attributes": quote.td_attributes.to_bytes(8, "little").hex(),
        "debug": quote.debug,
        "report_data": quote.report_data.hex(),
        "mr_seam": quote.mr_seam.hex(),
        "mr_config_id": quote.mr_config_id.hex(),
        "mr_owner": quote.mr_owner.hex(),
        "mr_owner_config": quote.mr_owner_config.hex(),
        "xfam": quote.xfam.hex(),
        "tee_tcb_svn": quote.tee_tcb_svn.hex(),
    }


def check_policy(verdict: Verdict, policy: Any) -> None:
    """Reference values (TdxPolicy): accepted MRTDs and RTMR sets, the TD attributes."""
    claims = verdict.claims
    want = getattr(policy, "td_attributes", None)
    got = int.from_bytes(bytes.fromhex(claims["td_attributes"]), "little")
    if want is not None and got != want:
        verdict.fail(f"TD attributes 0x{got:x} differ from the policy's 0x{want:x}")
    config_ids = getattr(policy, "mr_config_id", None)
    if config_ids and claims["mr_config_id"] not in config_ids:
        verdict.fail(f"MRCONFIGID {claims['mr_config_id'][:16]}... is not the policy's (a pod's: "
                     "its initdata digest)")  # fmt: skip
    if policy.mrtd and claims["mr_td"] not in policy.mrtd:
        verdict.fail(f"unknown MRTD {claims['mr_td'][:16]}... (not in the policy)")
    if policy.rtmrs:
        measured = [claims[f"rtmr_{i}"] for i in range(4)]
        if not any(
            all(w in (None, m) for w, m in zip(accepted, measured, strict=True))
            for accepted in policy.rtmrs
        ):
            verdict.fail("RTMRs match none of the policy's accepted sets")
