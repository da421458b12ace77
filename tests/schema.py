"""A current libvirt RelaxNG schema for validating rendered domain XML.

The system's libvirt (9.0 on Debian 12) predates `<launchSecurity type='tdx'>` and
`type='sev-snp'`, so its schema cannot judge TDX or SNP domains. Debian unstable's
`libvirt-common` ships `/usr/share/libvirt/schemas/*.rng` of a current libvirt: it is fetched with
apt into a private folder (the system's apt state is never touched), unpacked with `dpkg -x`, and
cached under `cache_root()/schemas`. The mirror is the one already configured in the system's apt
sources; no host name is written here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.paths import cache_root

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PACKAGE = "libvirt-common"


STORED = Path(__file__).resolve().parent / "fixtures" / "libvirt-schema"


def stored() -> Schemas:
    """The copy of a current libvirt's schema kept in the repository (README.md there says where
    it came from): the render tests validate against it offline, on any machine."""
    version = (STORED / "VERSION").read_text().strip()
    return Schemas(STORED, version)


class SchemaUnavailable(Exception):
    """No package registry could be reached: the caller skips with this text."""


class SchemaToolsMissing(SchemaUnavailable):
    """apt/dpkg or the system's apt sources are missing: a skip outside CI, a failure in CI."""


@dataclass(frozen=True)
class Schemas:
    root: Path  # the folder holding domain.rng, network.rng, ...
    version: str  # the libvirt-common package version they came from

    @property
    def domain(self) -> Path:
        return self.root / "domain.rng"

    @property
    def network(self) -> Path:
        return self.root / "network.rng"


def _deb822_uris(text: str) -> list[str]:
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(
            (m.group(1).lower(), m.group(2).strip())
            for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE)
        )
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            uris += fields.get("uris", "").split()
    return uris


def _one_line_uris(text: str) -> list[str]:
    uris = []
    for line in text.splitlines():
        m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
        if m:
            uris.append(m.group(1))
    return uris


def mirror_uri(sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST) -> str:
    """The Debian archive URI the system's apt already uses (not the security archive)."""
    uris: list[str] = []
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            uris += _deb822_uris(path.read_text())
        for path in sorted(sources_dir.glob("*.list")):
            uris += _one_line_uris(path.read_text())
    if sources_list.is_file():
        uris += _one_line_uris(sources_list.read_text())
    archive = [u for u in uris if "security" not in u and not u.startswith("cdrom:")]
    if not archive:
        raise SchemaToolsMissing("no Debian archive URI in the system's apt sources")
    return archive[0].rstrip("/")


def _apt(argv: list[str], options: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "-q", *options, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def fetch(dest: Path | None = None) -> Schemas:
    """Return the cached schemas, downloading Debian unstable's libvirt-common if needed."""
    dest = dest or cache_root() / "schemas"
    marker = dest / "VERSION"
    if marker.is_file() and (dest / "domain.rng").is_file():
        return Schemas(dest, marker.read_text().strip())
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SchemaToolsMissing("apt-get/dpkg not found: cannot fetch a current libvirt schema")
    uri = mirror_uri()
    with tempfile.TemporaryDirectory(prefix="gcvm-schema-") as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial"):
            (work / sub).mkdir(parents=True)
        signed = f"[signed-by={KEYRING}] " if KEYRING.is_file() else ""
        (work / "sid.list").write_text(f"deb {signed}{uri} sid main\n")
        options = [
            "-o",
            f"Dir::Etc::SourceList={work / 'sid.list'}",
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            f"Dir::State::Lists={work / 'lists'}",
            "-o",
            f"Dir::Cache={work / 'cache'}",
            "-o",
            "APT::Sandbox::User=root",
        ]
        update = _apt(["update"], options, work)
        if update.returncode != 0 or not any((work / "lists").glob("*Packages*")):
            raise SchemaUnavailable(
                f"apt-get update against {uri} sid failed: {update.stderr.strip()[-300:]}"
            )
        download = _apt(["download", PACKAGE], options, work)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if download.returncode != 0 or not debs:
            raise SchemaUnavailable(f"apt-get download {PACKAGE} failed: {download.stderr[-300:]}")
        unpacked = work / "root"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True, timeout=120)
        version = debs[0].name.split("_")[1]
        staging = dest.with_name(dest.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(unpacked / "usr/share/libvirt/schemas", staging)
        (staging / "VERSION").write_text(version + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
    return Schemas(dest, version)


def validate(xml: str | bytes, rng: Path) -> list[str]:
    """Errors of `xml` against the RelaxNG file `rng` (empty: valid)."""
    from lxml import etree

    schema = etree.RelaxNG(etree.parse(str(rng)))
    doc = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    if schema.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
