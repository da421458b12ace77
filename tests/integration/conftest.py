"""Fixtures for tests that boot real VMs.

`vm_host` decides whether this host can boot them (root, QEMU, libvirt's daemons, network
namespaces) and skips with the precise reason when it cannot, except under CI=true, where a host
that cannot is a failure. `built_image` is gcvm's guest image, built once when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from orchestrator import image as image_mod
from orchestrator.errors import ImageMissing

IN_CI = os.environ.get("CI", "").lower() == "true"
TOOLS = ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "ip", "unshare")


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI the host must be able to run VM tests."""
    if IN_CI:
        pytest.fail(f"CI=true but this host cannot boot VMs: {reason}")
    pytest.skip(f"this host cannot boot VMs: {reason}")


def vm_host_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, private libvirtd)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/install-system-deps.sh installs it)"
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`ip netns` does not work here: {proc.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def vm_host() -> None:
    problem = vm_host_problem()
    if problem:
        unavailable(problem)


@pytest.fixture(scope="session")
def built_image(vm_host: None) -> image_mod.Image:
    try:
        return image_mod.find_image()
    except ImageMissing:
        return image_mod.build_image()
