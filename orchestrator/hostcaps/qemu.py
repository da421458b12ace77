"""Asking the QEMU binary itself: its version and its `help` listings."""

from __future__ import annotations

import subprocess

from orchestrator.hostcaps.versions import Version, parse_version
from orchestrator.ui import log

QEMU_BINARY = "qemu-system-x86_64"


def _qemu_out(qemu: str, *args: str) -> str:
    try:
        proc = subprocess.run(
            [qemu, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s %s failed: %s", qemu, " ".join(args), exc)
        return ""
    return proc.stdout


def qemu_binary_version(qemu: str = QEMU_BINARY) -> Version | None:
    return parse_version(_qemu_out(qemu, "--version"))


def _qemu_list(qemu: str, *args: str) -> list[str]:
    """First words of the lines after the heading of a QEMU `help` listing."""
    lines = _qemu_out(qemu, *args).splitlines()
    return [ln.split()[0] for ln in lines[1:] if ln.strip()]
