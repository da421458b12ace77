"""The confidential-VM firmware that reference values are computed against, from Debian.

Debian ships the SEV-SNP build of OVMF (with the kernel-hashes table a measured direct boot needs)
as `ovmf-amdsev` and the TDX build (TDVF) as `ovmf-inteltdx`, in forky and sid only. They declare
`Breaks: ovmf (<< 2025.11~)`, so they are never installed here: a private apt configuration (its
own sources.list, lists and cache folders, `-o Dir::...`; the system's apt state is untouched)
runs `apt-get update` and `apt-get download` against the Debian mirror the system already uses,
and `dpkg-deb -x` unpacks the one file into the cache. The host's keyring checks the archive's
signatures as for any apt download; the .deb's version and SHA-256 are recorded beside the file.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.digests import file_sha256
from orchestrator.errors import HostUnsupported
from orchestrator.image.apt import host_apt_sources
from orchestrator.paths import cache_root

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SUITE = "sid"
RECORD = "firmware.json"


@dataclass(frozen=True)
class FirmwarePackage:
    package: str
    member: str  # the file inside the .deb


PACKAGES = {
    "sev-snp": FirmwarePackage("ovmf-amdsev", "usr/share/ovmf/OVMF.amdsev.fd"),
    "tdx": FirmwarePackage("ovmf-inteltdx", "usr/share/ovmf/OVMF.inteltdx.ms.fd"),
}


@dataclass(frozen=True)
class Firmware:
    path: Path
    package: str
    version: str  # the Debian package version
    deb_sha256: str  # of the downloaded .deb
    sha256: str  # of the firmware file itself


class FirmwareUnavailable(HostUnsupported):
    """apt cannot reach a mirror, or the package is not there (tests skip with this text)."""


def firmware_dir(tee: str) -> Path:
    return cache_root() / "firmware" / PACKAGES[tee].package


def mirror_uri() -> str:
    """The Debian archive the system's apt already uses (not the security archive)."""
    for source in host_apt_sources():
        uri = source.uri.rstrip("/")
        if "security" not in uri and not uri.startswith("cdrom:") and "debian" in uri:
            return uri
    raise FirmwareUnavailable(
        "no Debian archive in the system's apt sources to download the firmware from",
        hint="add the Debian mirror you use to /etc/apt/sources.list.d/debian.sources",
    )


def cached_firmware(tee: str) -> Firmware | None:
    folder = firmware_dir(tee)
    try:
        data = json.loads((folder / RECORD).read_text())
        found = Firmware(path=folder / Path(PACKAGES[tee].member).name, **data)
    except (OSError, ValueError, TypeError):
        return None
    return found if found.path.is_file() and file_sha256(found.path) == found.sha256 else None


def _apt(argv: list[str], options: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["apt-get", "-q", *options, *argv], cwd=cwd,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise FirmwareUnavailable(f"apt-get {argv[0]} took over 300 s") from None


def fetch_firmware(tee: str) -> Firmware:
    """The cached firmware for `tee` ("sev-snp" or "tdx"), downloading it on first use."""
    if (found := cached_firmware(tee)) is not None:
        return found
    pkg = PACKAGES[tee]
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FirmwareUnavailable("apt-get/dpkg-deb not found: cannot download the firmware",
                                  hint=f"download Debian's {pkg.package} .deb by hand")  # fmt: skip
    uri = mirror_uri()
    with tempfile.TemporaryDirectory(prefix="gcvm-firmware-") as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial"):
            (work / sub).mkdir(parents=True)
        signed = f"[signed-by={KEYRING}] " if KEYRING.is_file() else ""
        (work / "sources.list").write_text(f"deb {signed}{uri} {SUITE} main\n")
        options = []
        for option in (
            f"Dir::Etc::SourceList={work / 'sources.list'}",
            "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={work / 'lists'}",
            f"Dir::Cache={work / 'cache'}",
            f"APT::Sandbox::User={getpass.getuser()}",
        ):
            options += ["-o", option]
        update = _apt(["update"], options, work)
        if update.returncode != 0 or not any((work / "lists").glob("*Packages*")):
            raise FirmwareUnavailable(
                f"apt-get update against {uri} {SUITE} failed: "
                + (update.stderr.strip().splitlines() or ["no package lists"])[-1],
                hint="the firmware comes from Debian's mirror: check the network or the proxy",
            )
        download = _apt(["download", pkg.package], options, work)
        debs = sorted(work.glob(f"{pkg.package}_*.deb"))
        if download.returncode != 0 or not debs:
            raise FirmwareUnavailable(f"apt-get download {pkg.package} from {uri} {SUITE} failed: "
                                      + download.stderr.strip()[-200:])  # fmt: skip
        deb = debs[0]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True, timeout=120)
        unpacked = work / "root" / pkg.member
        if not unpacked.is_file():
            raise FirmwareUnavailable(f"{deb.name} holds no {pkg.member}")
        folder = firmware_dir(tee)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / unpacked.name
        shutil.copyfile(unpacked, target.with_suffix(".new"))
        os.replace(target.with_suffix(".new"), target)
        found = Firmware(
            path=target,
            package=pkg.package,
            version=deb.name.split("_")[1].replace("%3a", ":"),
            deb_sha256=file_sha256(deb),
            sha256=file_sha256(target),
        )
        record = {k: v for k, v in found.__dict__.items() if k != "path"}
        (folder / (RECORD + ".new")).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(folder / (RECORD + ".new"), folder / RECORD)
    return found
