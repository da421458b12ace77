"""Least privilege for the guests: QEMU runs as an unprivileged user, and libvirt's DAC driver
hands it the cluster's own files (overlays, seed ISOs, serial logs) for the VM's lifetime.

On a private daemon the user is set in its qemu.conf; on a shared daemon (`--connect`, whose
qemu.conf is not gcvm's) each domain carries a static DAC <seclabel> naming it. The user is the
first of GUEST_USERS the host has (Debian's libvirt-qemu, Fedora's qemu); without one, QEMU runs
as root as before, and `up` says so.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import HostUnsupported

GUEST_USERS = ("libvirt-qemu", "qemu")


@dataclass(frozen=True)
class GuestUser:
    user: str
    group: str
    uid: int
    gid: int

    @property
    def label(self) -> str:
        """The DAC label libvirt takes in <seclabel model="dac">: "user:group"."""
        return f"{self.user}:{self.group}"


def guest_user(candidates: Iterable[str] = GUEST_USERS) -> GuestUser | None:
    """The unprivileged user QEMU runs as here (None: the host has none of them)."""
    for name in candidates:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        group = grp.getgrgid(entry.pw_gid).gr_name
        return GuestUser(name, group, entry.pw_uid, entry.pw_gid)
    return None


def _may(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    """Whether a user with `uid` and groups `gids` has the (owner, group, other) `bits`."""
    owner, group, other = bits
    if st.st_uid == uid:
        return bool(st.st_mode & owner)
    if st.st_gid in gids:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


def unreachable(path: Path, user: GuestUser, *, read: bool = False) -> Path | None:
    """The first folder above `path` that `user` cannot search (with `read`, also `path` itself
    when it cannot read it); None when it can reach it. libvirt's DAC driver chowns the file
    itself (a seed ISO is 0600: it holds the VM's host key), never the folders above it."""
    gids = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.user in g.gr_mem}
    path = path.absolute()
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except OSError:
            return folder
        if not _may(st, user.uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return folder
    if (
        read
        and path.exists()
        and not _may(path.stat(), user.uid, gids, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH))
    ):
        return path
    return None


def require_reachable(paths: Iterable[Path], user: GuestUser) -> None:
    """HostUnsupported naming the first file QEMU (as `user`) could not reach: a folder above
    it that the user cannot search."""
    for path in paths:
        blocked = unreachable(path, user)
        if blocked is not None:
            raise HostUnsupported(
                f"QEMU runs as {user.user} and cannot reach {path}: {blocked} is "
                f"{oct(blocked.stat().st_mode & 0o777) if blocked.exists() else 'missing'}",
                hint=f"let others search it (`chmod o+x {blocked}`), or put GCVM_HOME / "
                "GCVM_CACHE under a folder that others can search",
            )
