"""Debian's SEV-SNP OVMF (`ovmf-amdsev`) for tests, through the same function as `gcvm attest
firmware` (a private apt configuration, `apt-get download`, `dpkg-deb -x`; cached under
cache_root()/firmware). Fetched at most once per session; tests skip with the reason when apt
cannot reach the mirror."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from orchestrator.attest.firmware import FirmwareUnavailable, fetch_firmware


@functools.cache
def _fetch(tee: str) -> Path | str:
    try:
        return fetch_firmware(tee).path
    except FirmwareUnavailable as exc:
        return f"no {tee} OVMF from Debian's mirror: {exc.message}"


def firmware_or_skip(tee: str = "sev-snp") -> Path:
    found = _fetch(tee)
    if isinstance(found, str):
        pytest.skip(found)
    return found
