"""The broker's challenges, held by the client, not the broker: an `auth` answer's session cookie
is a token that the broker verifies at `attest` by its MAC, so that an unauthenticated peer makes
the broker keep nothing (a flood of `auth` requests cannot crowd out a genuine guest).

    token = base64url(nonce[32] | issued_ms[8, big-endian] | tee[1] | HMAC-SHA256(key, ...)[32])

The MAC (under a key drawn from `os.urandom` when the broker starts, so a restart voids every
challenge) binds the nonce, its issue time and the TEE the guest declared. A nonce expires
`nonce_ttl_s` after its issue; it is consumed by a successful attestation only, and the consumed
ones are remembered until they expire (a bounded set that only verified guests can fill), so a
replayed nonce is still refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import threading
from dataclasses import dataclass

TEES = ("snp", "tdx", "sample")
_DOMAIN = b"gcvm-kbs-challenge-v1\0"
_BODY = struct.Struct(">32sQB")
_MAC = 32


@dataclass(frozen=True)
class Challenge:
    token: str  # the session cookie's value
    nonce: str  # base64 of 32 random bytes, as Trustee's KBS sends it
    issued: float
    tee: str


class Challenges:
    def __init__(self, max_consumed: int) -> None:
        self._key = os.urandom(32)
        self._max_consumed = max_consumed
        self._consumed: dict[str, float] = {}  # nonce -> when it expires
        self._lock = threading.Lock()

    def issue(self, tee: str, now: float) -> Challenge:
        issued_ms = int(now * 1000)
        body = _BODY.pack(os.urandom(32), issued_ms, TEES.index(tee))
        token = base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode()
        return self._challenge(token, body)

    def open(self, token: str | None) -> Challenge | None:
        """The challenge this broker issued as `token`; None for anything else."""
        if not token or len(token) > 128:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _BODY.size + _MAC:
            return None
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)) or body[-1] >= len(TEES):
            return None
        return self._challenge(token, body)

    def consumed(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._consumed

    def consume(self, challenge: Challenge, expires: float, now: float) -> str | None:
        """Mark the nonce used (after its attestation verified); the reason if it cannot be."""
        with self._lock:
            if challenge.nonce in self._consumed:
                return "nonce already used: each challenge takes one attestation, ask for a new one"
            if len(self._consumed) >= self._max_consumed:
                for nonce in [n for n, t in self._consumed.items() if t < now]:
                    del self._consumed[nonce]
            if len(self._consumed) >= self._max_consumed:
                return "too many attestations within a nonce's lifetime: try again later"
            self._consumed[challenge.nonce] = expires
            return None

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + body, hashlib.sha256).digest()

    @staticmethod
    def _challenge(token: str, body: bytes) -> Challenge:
        nonce, issued_ms, tee = _BODY.unpack(body)
        return Challenge(token, base64.b64encode(nonce).decode(), issued_ms / 1000, TEES[tee])
