"""Version numbers: parsed from text, from libvirt's integers, printed."""

from __future__ import annotations

import re

Version = tuple[int, int, int]


def parse_version(text: str | None) -> Version | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def libvirt_number_to_version(number: int) -> Version:
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def fmt_version(version: Version | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"
