"""Debian unstable's SEV-SNP OVMF (`ovmf-amdsev`), fetched like tests/schema.py fetches libvirt's
schemas: a private apt configuration against the mirror the system already uses, `apt-get
download`, `dpkg -x`, cached under cache_root()/ovmf-amdsev. Tests skip when it cannot be had."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from orchestrator.paths import cache_root
from tests.schema import KEYRING, SchemaUnavailable, mirror_uri

PACKAGE = "ovmf-amdsev"
FIRMWARE = "usr/share/ovmf/OVMF.amdsev.fd"


def fetch_ovmf_amdsev(dest: Path | None = None) -> Path:
    dest = dest or cache_root() / "ovmf-amdsev"
    if (dest / "OVMF.amdsev.fd").is_file():
        return dest / "OVMF.amdsev.fd"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SchemaUnavailable("apt-get/dpkg not found")
    uri = mirror_uri()
    with tempfile.TemporaryDirectory(prefix="gcvm-ovmf-") as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial"):
            (work / sub).mkdir(parents=True)
        signed = f"[signed-by={KEYRING}] " if KEYRING.is_file() else ""
        (work / "sid.list").write_text(f"deb {signed}{uri} sid main\n")
        options = []
        for option in (
            f"Dir::Etc::SourceList={work / 'sid.list'}",
            "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={work / 'lists'}",
            f"Dir::Cache={work / 'cache'}",
            "APT::Sandbox::User=root",
        ):
            options += ["-o", option]
        for argv in (["update"], ["download", PACKAGE]):
            done = subprocess.run(
                ["apt-get", "-q", *options, *argv],
                cwd=work, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise SchemaUnavailable(f"apt-get {argv[0]}: {done.stderr.strip()[-300:]}")
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise SchemaUnavailable(f"apt-get download {PACKAGE} gave no package")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(work / "root")], check=True, timeout=120)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "root" / FIRMWARE, dest / "OVMF.amdsev.fd.new")
        (dest / "OVMF.amdsev.fd.new").rename(dest / "OVMF.amdsev.fd")
        (dest / "VERSION").write_text(debs[0].name.split("_")[1] + "\n")
    return dest / "OVMF.amdsev.fd"
