"""The SHA-256 of a file, read in blocks (kernels, initrds, firmware and .debs are tens of MB)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
