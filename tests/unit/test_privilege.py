"""Least privilege: QEMU as an unprivileged user with libvirt's DAC ownership of the cluster's
files; the private daemon's qemu.conf names the user, a shared daemon gets a per-domain label."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cluster, privatelibvirt, privilege
from orchestrator.cluster.backend import Backend
from orchestrator.errors import HostUnsupported
from orchestrator.privilege import GuestUser
from orchestrator.spec import ClusterSpec
from tests.unit.test_cluster import FakeBackend

USER = GuestUser("libvirt-qemu", "kvm", 64055, 64055)


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        "orchestrator.cluster.backend.guest_user", lambda: USER
    )  # as on Debian, whatever this host has
    yield FakeBackend(tmp_path)


def test_private_daemon_runs_qemu_as_the_unprivileged_user() -> None:
    conf = privatelibvirt.qemu_conf(USER)
    assert 'user = "libvirt-qemu"' in conf and 'group = "kvm"' in conf
    assert "dynamic_ownership = 1" in conf and 'user = "root"' not in conf
    assert 'user = "root"' in privatelibvirt.qemu_conf(None)  # only without such a user


def test_guest_user_is_the_first_the_host_has() -> None:
    assert privilege.guest_user(("no-such-user-gcvm",)) is None
    root = privilege.guest_user(("root",))
    assert root is not None and root.uid == 0 and root.label == "root:root"


def test_shared_daemon_domains_carry_a_dac_label(backend: FakeBackend) -> None:
    st = cluster.up(ClusterSpec(name="sh", connect="qemu:///system"), backend=backend)
    for xml in backend.hv.defined.values():
        assert '<seclabel type="static" model="dac" relabel="yes">' in xml
        assert "<label>libvirt-qemu:kvm</label>" in xml
    assert st.host["qemu_user"] == "libvirt-qemu:kvm"
    # QEMU must reach the shared image and the cluster's own disks, seeds and logs
    files = set(backend.checked_files)
    assert {Path(vm.disk) for vm in st.vms} <= files and {Path(vm.seed) for vm in st.vms} <= files
    assert {Path(vm.serial_log) for vm in st.vms} <= files and backend.image.disk in files
    cluster.down("sh", backend=backend)


def test_private_daemon_domains_leave_the_user_to_qemu_conf(backend: FakeBackend) -> None:
    cluster.up(ClusterSpec(name="pv"), backend=backend)
    assert all("<seclabel" not in xml for xml in backend.hv.defined.values())
    cluster.down("pv", backend=backend)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder everyone can search (pytest's own tmp_path sits under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="gcvm-priv-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_folder_qemu_cannot_search_is_named(open_dir: Path) -> None:
    locked = open_dir / "locked"
    (locked / "disks").mkdir(parents=True)
    os.chmod(locked, 0o700)
    disk = locked / "disks" / "vm.qcow2"
    disk.write_text("x")
    assert privilege.unreachable(disk, USER) == locked
    with pytest.raises(HostUnsupported, match=f"cannot reach {disk}: {locked} is 0o700") as err:
        Backend().check_guest_access(
            [disk],
            cluster.HostFacts(accel=None, caps=None, facts={}, guest_user=USER),  # type: ignore[arg-type]
            ClusterSpec(name="x"),
        )
    assert err.value.hint and f"chmod o+x {locked}" in err.value.hint
    os.chmod(locked, 0o755)
    assert privilege.unreachable(disk, USER) is None
    os.chmod(disk, 0o600)  # like a seed ISO: libvirt's DAC driver chowns the file itself
    assert privilege.unreachable(disk, USER) is None
    assert privilege.unreachable(disk, USER, read=True) == disk
