"""What every verifier shares: the verdict, its errors, and the KBS report-data binding."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import GcvmError, UsageError


class EvidenceRefused(GcvmError):
    """Evidence that parsed but does not verify, or that the policy does not accept (exit 1)."""


class BadEvidence(UsageError):
    """Evidence, certificates or collateral that cannot be read at all (exit 2)."""


@dataclass
class Verdict:
    """Claims read from one report or quote, and every check that failed (empty: valid).

    `verified` lists what was proved (signature, chain, collateral); claims from evidence whose
    signature failed are printed but mean nothing.
    """

    tee: str
    claims: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "valid"

    def fail(self, message: str) -> None:
        self.failures.append(message)


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) for what KBS runtime data holds: objects, arrays, strings, integers, bools.

    Trustee hashes `serde_json_canonicalizer::to_vec(runtime_data)`; for these types JCS is sorted
    keys, no whitespace, UTF-8 (floats, whose JCS form differs from Python's, are refused).
    """

    def check(v: Any) -> None:
        if isinstance(v, float):
            raise BadEvidence("runtime data holds a float, which has no canonical form here")
        if isinstance(v, dict):
            for key, item in v.items():
                if not isinstance(key, str):
                    raise BadEvidence("runtime data has a non-string key")
                check(item)
        elif isinstance(v, list):
            for item in v:
                check(item)

    check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def expected_report_data(nonce: str, tee_pubkey: dict[str, Any]) -> bytes:
    """SHA-384 of the canonical JSON {"nonce", "tee-pubkey"}, zero-padded to 64 bytes."""
    digest = hashlib.sha384(canonical_json({"nonce": nonce, "tee-pubkey": tee_pubkey})).digest()
    return digest.ljust(64, b"\0")


def parse_hex(value: str, what: str, size: int | None = None) -> bytes:
    text = value.strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} is not hex: {value[:40]!r}") from None
    if size is not None and len(raw) != size:
        raise UsageError(f"{what} has {len(raw)} bytes, expected {size}")
    return raw
