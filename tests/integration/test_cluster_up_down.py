"""`gcvm up` / `gcvm down` for real: a master and a worker under a private libvirt in a network
namespace, reached over SSH with pinned host keys; then nothing may be left behind.

Each boot costs about a minute of both cores under TCG, so there are two tests: the whole life of
a healthy cluster, and an `up` that cannot reach its VMs in time.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import keys, netns, privatelibvirt, state
from orchestrator.remote import HostKeyMismatch, Remote, endpoint_for
from tests.integration.conftest import (
    Env,
    assert_nothing_left,
    cluster_name,
    processes_mentioning,
    qemu_uids,
)

pytestmark = pytest.mark.vm

UP_TARGET_S = 90.0
DOWN_TARGET_S = 10.0


def test_up_ssh_down(gcvm_env: Env, tmp_path: Path) -> None:
    name = cluster_name()
    start = time.monotonic()
    up = gcvm_env.gcvm("up", "--tee", "none", "--workers", "1", "--name", name)
    up_s = time.monotonic() - start
    try:
        assert up.returncode == 0, up.stderr
        print(f"gcvm up (master + 1 worker): {up_s:.1f} s")
        st = state.load(name)
        assert [vm.role for vm in st.vms] == ["master", "worker"]

        # least privilege: every guest's QEMU runs as the unprivileged user, not root
        uids = qemu_uids(name)
        assert set(uids) == {vm.name for vm in st.vms}, uids
        assert all(uid != 0 for uid in uids.values()), uids
        assert set(uids.values()) == {pwd.getpwnam("libvirt-qemu").pw_uid}, uids
        assert st.host["qemu_user"].startswith("libvirt-qemu:")
        for vm in st.vms:  # libvirt's DAC driver handed it the VM's own overlay and seed
            assert Path(vm.disk).stat().st_uid == uids[vm.name]

        for vm in st.vms:
            assert vm.tee_verified == "none" and vm.ifname
            with Remote.connect(st, vm, timeout=30) as r:
                assert r.run(["hostname"], timeout=30).stdout.strip() == vm.name
                link = r.run(["ip", "-o", "link", "show", vm.ifname], timeout=30).stdout
                assert vm.mac in link
                python = st.image["python"]
                shown = r.run([python, "-m", "pip", "show", "gcvm"], timeout=120).stdout
                assert "Name: gcvm" in shown

        # a VM that shows another host key is refused
        wrong = tmp_path / "wrong_known_hosts"
        keys.write_known_hosts(
            wrong, {vm.address: keys.generate_ed25519().public_openssh for vm in st.vms}
        )
        ep = endpoint_for(st, st.vms[0])
        with pytest.raises(HostKeyMismatch):
            Remote.open(type(ep)(**{**ep.__dict__, "known_hosts": wrong}), timeout=20)

        # the name is taken: refused before anything is created, with the way out
        again = gcvm_env.gcvm("up", "--tee", "none", "--workers", "1", "--name", name)
        assert again.returncode == 2 and f"gcvm down --name {name}" in again.stderr
        assert "Traceback" not in again.stderr

        status = gcvm_env.gcvm("status", "--name", name)
        assert status.returncode == 0, status.stderr
        assert f"{name}-worker0" in status.stdout and "running" in status.stdout
        ssh = gcvm_env.gcvm("ssh", "worker0", "--name", name, "--", "cat", "/etc/hostname")
        assert (ssh.returncode, ssh.stdout.strip()) == (0, f"{name}-worker0"), ssh.stderr
        assert gcvm_env.gcvm("ssh", "0", "--name", name, "--", "false").returncode == 1
        logs = gcvm_env.gcvm("logs", "master0", "--name", name)
        assert logs.returncode == 0 and "Linux version" in logs.stdout
    finally:
        start = time.monotonic()
        down = gcvm_env.gcvm("down", "--name", name, timeout=120)
        down_s = time.monotonic() - start
    assert down.returncode == 0, down.stderr
    print(f"gcvm down: {down_s:.1f} s")
    assert_nothing_left(name)
    again = gcvm_env.gcvm("down", "--name", name)
    assert again.returncode == 0 and "nothing to remove" in again.stderr
    assert up_s <= UP_TARGET_S * 2, f"up took {up_s:.0f} s (target {UP_TARGET_S:.0f} s)"
    assert down_s <= DOWN_TARGET_S, f"down took {down_s:.1f} s"


def test_unreachable_vm_fails_and_cleans_up(gcvm_env: Env) -> None:
    """A deadline shorter than a TCG boot: `up` names a VM, shows its console, removes all."""
    name = cluster_name()
    start = time.monotonic()
    up = gcvm_env.gcvm("up", "--tee", "none", "--workers", "1", "--name", name, "--timeout", "15")
    elapsed = time.monotonic() - start
    try:
        assert up.returncode != 0
        assert "did not become reachable over SSH" in up.stderr
        assert f"{name}-master0" in up.stderr or f"{name}-worker0" in up.stderr
        assert "serial console" in up.stderr
        assert "Traceback" not in up.stderr
        assert elapsed < 15 + 60, f"up failed only after {elapsed:.0f} s"
        assert_nothing_left(name)
    finally:
        gcvm_env.gcvm("down", "--name", name, timeout=120)


def _host_firewall() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True).stdout


def test_private_daemon_stays_in_its_namespace(
    vm_host: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No VM: the private libvirtd, its NAT network, bridge and firewall rules live in the
    namespace only; a dead daemon is a clear error; stopping leaves no process."""
    from orchestrator import render
    from orchestrator.errors import HypervisorError
    from orchestrator.hypervisor import LibvirtHypervisor
    from orchestrator.spec import ClusterSpec, plan_vms

    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GCVM_CACHE", os.environ.get("GCVM_CACHE") or "/var/cache/gcvm")
    name = cluster_name()
    ns = f"gcvm-{name}"
    firewall_before = _host_firewall()
    host_links = set(os.listdir("/sys/class/net"))
    netns.create(ns)
    try:
        daemon = privatelibvirt.start(name, ns, tmp_path / "libvirt")
        spec = ClusterSpec(name=name)
        with LibvirtHypervisor(daemon.uri) as hv:
            hv.define_network(render.render_network(spec, plan_vms(spec, tmp_path)))
            assert hv.network_exists(spec.network_name)
        inside = subprocess.run(
            ["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True
        ).stdout
        assert "LIBVIRT" in inside and str(spec.ipv4) in inside
        assert _host_firewall() == firewall_before
        assert set(os.listdir("/sys/class/net")) == host_links  # virbr0 is not on the host
        import socket

        links = netns.call_in(ns, lambda: {n for _, n in socket.if_nameindex()})
        assert "virbr0" in links

        os.kill(daemon.libvirtd_pid, 9)
        time.sleep(0.5)
        with pytest.raises(HypervisorError) as err:
            LibvirtHypervisor(daemon.uri)
        assert err.value.hint and "gcvm down" in err.value.hint
    finally:
        privatelibvirt.stop(name)
        for pid in netns.pids(ns):
            os.kill(pid, 9)
        netns.delete(ns)
    time.sleep(0.5)
    assert processes_mentioning(name) == []


def test_missing_image_is_a_clear_error(vm_host: None, tmp_path: Path) -> None:
    env = {**os.environ, "GCVM_HOME": str(tmp_path / "home"), "GCVM_CACHE": str(tmp_path / "c")}
    name = cluster_name()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "up", "--workers", "1", "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no guest image" in proc.stderr and "gcvm image build" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not netns.exists(f"gcvm-{name}")
    assert not (tmp_path / "home" / "state" / "clusters" / name).exists()
