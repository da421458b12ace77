"""The host's apt sources (one-line and deb822), and the Debian entries the guest is built from."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import HostUnsupported
from orchestrator.image.model import (
    SUITE,
)


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str | None = None

    def line(self) -> str:
        """A one-line sources.list entry, as mmdebstrap takes it for a MIRROR argument."""
        options = f" [signed-by={self.signed_by}]" if self.signed_by else ""
        return f"deb{options} {self.uri} {self.suite} {' '.join(self.components)}"


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = None
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif raw[0] in " \t" and key is not None:
            fields[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()


def parse_deb822(text: str) -> list[AptSource]:
    sources = []
    for fields in _deb822_paragraphs(text):
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        signed_by = fields.get("signed-by")
        if signed_by and "\n" in signed_by:  # an inline key block cannot go on one line
            signed_by = None
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                sources.append(AptSource(uri, suite, components, signed_by))
    return sources


_ONE_LINE = re.compile(
    r"^deb\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)"
    r"(?P<components>(?:\s+\S+)*)\s*$"
)


def parse_one_line(text: str) -> list[AptSource]:
    sources = []
    for raw in text.splitlines():
        match = _ONE_LINE.match(raw.split("#", 1)[0].strip())
        if not match:
            continue
        options = dict(opt.split("=", 1) for opt in (match["options"] or "").split() if "=" in opt)
        sources.append(
            AptSource(
                match["uri"],
                match["suite"],
                tuple(match["components"].split()),
                options.get("signed-by"),
            )
        )
    return sources


def host_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    sources = []
    if (etc_apt / "sources.list").exists():
        sources += parse_one_line((etc_apt / "sources.list").read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text())
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text())
    return sources


def debian_sources(sources: Sequence[AptSource], suite: str = SUITE) -> list[AptSource]:
    """The Debian entries for `suite`: the suite itself and its -updates/-security/... suites.
    Third-party repositories (their own suite names) are left out."""
    chosen = [s for s in sources if s.suite == suite or s.suite.startswith(f"{suite}-")]
    unique = list(dict.fromkeys(chosen))
    if not any(s.suite == suite for s in unique):
        raise HostUnsupported(
            f"the host's apt sources have no Debian '{suite}' entry to build the guest from",
            hint="add the Debian mirror you use to /etc/apt/sources.list.d/debian.sources",
        )
    return unique
