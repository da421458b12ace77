"""Where gcvm keeps its state and caches.

Root: /var/lib/gcvm (state) and /var/cache/gcvm (images), so that a system libvirtd whose QEMU
runs as an unprivileged user can read the disks. Other users: the XDG directories.
`GCVM_HOME` puts both under one folder (tests use it); `GCVM_CACHE` overrides the cache alone
(so tests with a private GCVM_HOME still share the built image).
"""

from __future__ import annotations

import os
from pathlib import Path


def _home() -> Path | None:
    value = os.environ.get("GCVM_HOME")
    return Path(value) if value else None


def state_root() -> Path:
    if (home := _home()) is not None:
        return home / "state"
    if os.geteuid() == 0:
        return Path("/var/lib/gcvm")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gcvm"


def cache_root() -> Path:
    if os.environ.get("GCVM_CACHE"):
        return Path(os.environ["GCVM_CACHE"])
    if (home := _home()) is not None:
        return home / "cache"
    if os.geteuid() == 0:
        return Path("/var/cache/gcvm")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gcvm"


def cluster_dir(name: str) -> Path:
    return state_root() / "clusters" / name


def images_dir() -> Path:
    return cache_root() / "images"
