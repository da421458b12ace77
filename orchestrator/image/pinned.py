"""The pinned guest kernel (images/kernel.txt): its recipe line, and its .deb fetched once into
gcvm's cache with a private apt configuration (the host's own Debian mirror and keyring, the
pinned suite; /etc/apt is never touched) and checked against the recipe's SHA-256."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator import ui
from orchestrator.digests import file_sha256
from orchestrator.errors import GcvmError
from orchestrator.image.apt import AptSource
from orchestrator.image.commands import _run
from orchestrator.paths import cache_root

_LINE = re.compile(
    r"^(?P<package>linux-image-[a-z0-9.+-]+)\s+(?P<version>[0-9][A-Za-z0-9.+~-]*)\s+"
    r"(?P<suite>[a-z0-9-]+)\s+(?P<sha256>[0-9a-f]{64})$"
)


@dataclass(frozen=True)
class KernelPin:
    package: str  # linux-image-<kernel release>
    version: str  # the Debian version of that package
    suite: str  # where apt finds it, e.g. bookworm-backports
    sha256: str  # of the .deb

    @property
    def release(self) -> str:
        """The kernel release (`uname -r`, /boot/vmlinuz-<release>)."""
        return self.package.removeprefix("linux-image-")

    @property
    def deb_name(self) -> str:
        return f"{self.package}_{self.version.replace(':', '%3a')}_amd64.deb"


def parse_kernel_pin(text: str) -> KernelPin:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    match = _LINE.match(lines[0]) if len(lines) == 1 else None
    if match is None:
        raise GcvmError(
            "images/kernel.txt must hold one line: PACKAGE VERSION SUITE SHA256",
            hint="e.g. linux-image-6.12.95+deb12-cloud-amd64 6.12.95-1~bpo12+1 "
            "bookworm-backports <64 hex digits>",
        )
    return KernelPin(**match.groupdict())


def debs_dir() -> Path:
    return cache_root() / "debs"


def _private_apt(folder: Path, sources: Sequence[AptSource], suite: str) -> list[str]:
    """apt-get options for a configuration of its own in `folder`: the host's Debian mirrors
    (and their keyrings) with the pinned suite."""
    lists, cache = folder / "lists", folder / "cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    uris = {(s.uri, s.signed_by): s for s in sources if "security" not in s.suite}
    lines = [replace(s, suite=suite, components=("main",)).line() for s in uris.values()]
    (folder / "sources.list").write_text("\n".join(lines) + "\n")
    return [
        f"-oDir::Etc::SourceList={folder / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={lists}",
        f"-oDir::Cache={cache}",
        "-oAcquire::Languages=none",
        "-oAPT::Sandbox::User=root",
    ]


def fetch_kernel(pin: KernelPin, sources: Sequence[AptSource], log: Path) -> Path:
    """The pinned kernel's .deb in gcvm's cache, downloaded when it is not there yet (a rebuild
    needs no network for it); its SHA-256 must be the recipe's, or the build stops."""
    target = debs_dir() / pin.deb_name
    if target.is_file() and file_sha256(target) == pin.sha256:
        ui.info(f"kernel {pin.package} {pin.version}: cached {target}")
        return target
    debs_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=debs_dir()) as tmp:
        folder = Path(tmp)
        options = _private_apt(folder / "apt", sources, pin.suite)
        _run(["apt-get", *options, "-q", "update"], log, timeout=600)
        download = ["apt-get", *options, "-q", "download", f"{pin.package}={pin.version}"]
        _run(download, log, timeout=1200, cwd=folder)
        got = folder / pin.deb_name
        if not got.is_file():
            raise GcvmError(f"apt-get download left no {pin.deb_name}", hint=f"see {log}")
        actual = file_sha256(got)
        if actual != pin.sha256:
            raise GcvmError(
                f"{pin.deb_name} has SHA-256 {actual}, not the recipe's {pin.sha256}",
                hint="the mirror serves another build of this version: check images/kernel.txt",
            )
        os.chmod(got, 0o644)
        shutil.move(got, target)
    ui.info(f"kernel {pin.package} {pin.version}: fetched into {target}")
    return target
