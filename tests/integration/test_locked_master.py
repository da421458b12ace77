"""A locked master for real (`gcvm up --tee none --locked`: what every --tee tdx|sev-snp master
is): the benchmark runs from owner-signed packages with keys from the cluster's broker, through
the master's job agent only; then every way in the host has is tried, and refused:

- SSH: nothing listens on port 22 (for root or any user), and gcvm's own `ssh`, `push` and
  `run exec` refuse before trying;
- the agent: a job that is not the master rank, a host-chosen broker certificate, a model key
  file, a key file upload;
- the seed: the host writes the master a new seed ISO with its own SSH key and reboots it; the
  master comes back with its agent and still no SSH;
- the code: one changed byte of the code disk (the framework, under dm-verity): the master
  refuses to run anything, and says so on its console.
Nothing secret is on a disk the guest can write: every disk of the master is read-only.
Run it under `flock /tmp/gcvm-vm.lock` (it boots VMs).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.conftest import Env, assert_nothing_left, cluster_name

pytestmark = [pytest.mark.vm, pytest.mark.slow]

RUN = ["--model", "minilm-standin", "--modes", "hardened,groupcover", "--batch", "2", "--seq", "16",
       "--repeat", "2", "--warmup", "0", "--no-audit"]  # fmt: skip


def _port_open(netns_name: str | None, address: str, port: int) -> bool:
    from orchestrator import netns

    try:
        netns.connect_tcp(netns_name, address, port, 5).close()
    except OSError:
        return False
    return True


def _domain_xml(uri: str, domain: str) -> str:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return str(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()


def _restart(uri: str, domain: str) -> None:
    """Power the domain off and boot it again with the same definition (the host's power)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(domain)
        xml = dom.XMLDesc(0)
        dom.destroy()
        if not dom.isPersistent():
            conn.createXML(xml, 0)
        else:
            dom.create()
    finally:
        conn.close()


def test_locked_master_runs_packages_and_lets_the_host_nowhere(
    gcvm_env: Env, tmp_path: Path
) -> None:
    from orchestrator import keys, seed, state
    from orchestrator.agentclient import LockedGuest
    from orchestrator.errors import RemoteError, Timeout

    name = cluster_name()
    out = tmp_path / "results"
    up = gcvm_env.gcvm("up", "--tee", "none", "--locked", "--masters", "1", "--worker", "host",
                       "--broker", "--name", name, timeout=900)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        st = state.load(name)
        master = st.vms[0]
        assert master.locked and master.role == "master"
        # the master's command line (measured under a TEE) locks it and names its code's hash
        xml = _domain_xml(st.uri, master.name)
        cmdline = ET.fromstring(xml).findtext("./os/cmdline") or ""
        assert "gcvm.locked=1" in cmdline.split() and "gcvm.code=" in cmdline, cmdline
        bench = gcvm_env.gcvm("run", "bench", "--name", name, *RUN, "--out", str(out),
                              timeout=2400)  # fmt: skip
        assert bench.returncode == 0, (bench.stdout[-4000:], bench.stderr[-4000:])
        doc = json.loads(next(out.rglob("bench.json")).read_text())
        run = doc["runs"][master.name]
        release = run["settings"]["key_release"]
        assert release["broker_authenticated"] is True, release
        assert release["broker_identity"]["source"] == "kernel command line (measured)"
        assert all(p["package_authenticated"] for p in release["per_package"]), release
        results = {r["mode"]: r for r in run["results"]}
        assert set(results) == {"hardened", "groupcover"}
        for mode, r in results.items():
            assert r["rel_err"] is not None and r["rel_err"] <= 1e-4, (mode, r["rel_err"])

        # SSH: nothing listens, for root or anyone
        assert not _port_open(st.netns, master.address, 22)
        for argv in (("ssh", master.name, "--name", name, "--", "id"),
                     ("push", "--name", name),
                     ("run", "exec", "--name", name, "--role", "master", "--", "id"),
                     ("run", "bench", "--name", name, *RUN, "--seed", "3")):  # fmt: skip
            refused = gcvm_env.gcvm(*argv, timeout=120)
            assert refused.returncode != 0, argv
            assert "locked master" in refused.stderr + refused.stdout, (argv, refused.stderr)

        # the agent: only the master rank, nothing that decides trust
        guest = LockedGuest(master.name, master.address, st.netns)
        assert guest.health()["locked"] is True
        rank = ["launch", "--role", "master"]
        for job in ({"argv": ["bench", "--local"]},
                    {"argv": [*rank, "--broker-cert", "/tmp/x.pem"]},
                    {"argv": [*rank, "--key-file", "/tmp/model.key"]},
                    {"argv": rank, "env": {"LD_PRELOAD": "/x.so"}}):  # fmt: skip
            with pytest.raises(RemoteError, match="refused"):
                guest.request("POST", "/jobs", job)
        with pytest.raises(RemoteError, match="refused"):
            guest.request("PUT", "/packages/p/model.key", b"k" * 32)

        # the seed: the host's own key in a new seed ISO, and a reboot
        attacker = keys.generate_ed25519(comment="host-attacker")
        host_key = keys.generate_ed25519(comment=master.name)
        subnet = ipaddress.IPv4Network(st.spec["subnet"])
        cfg = seed.SeedConfig(hostname=master.name, authorized_keys=[attacker.public_openssh],
                              host_key_private_pem=host_key.private_openssh,
                              host_key_public=host_key.public_openssh, address=master.address,
                              prefix=subnet.prefixlen, gateway=str(subnet.network_address + 1),
                              mac=master.mac)  # fmt: skip
        seed.build_seed_iso(cfg, Path(master.seed))
        _restart(st.uri, master.name)
        health = guest.wait_health(time.monotonic() + 300)
        assert health["locked"] is True
        assert not _port_open(st.netns, master.address, 22)
        serial = Path(master.serial_log).read_text(errors="replace")
        assert "ignored from the seed" in serial and "authorized_keys" in serial

        # the code: one byte of the code disk changed, and a reboot
        code = state.cluster_dir(name) / "disks" / "code.img"
        with code.open("r+b") as disk:
            disk.seek(1024 + 100)  # in the file system's first block (its superblock)
            byte = disk.read(1)
            disk.seek(1024 + 100)
            disk.write(bytes([byte[0] ^ 0xFF]))
        _restart(st.uri, master.name)  # (the serial log starts anew with each boot)
        deadline = time.monotonic() + 300
        said = ""
        while time.monotonic() < deadline:
            said = Path(master.serial_log).read_text(errors="replace")
            if "the locked master runs nothing" in said:
                break
            time.sleep(2)
        assert "the locked master runs nothing" in said, said[-2000:]
        with pytest.raises((Timeout, RemoteError)):
            guest.wait_health(time.monotonic() + 20)

        # nothing the guest writes reaches a disk: every disk of the master is read-only
        disks = ET.fromstring(xml).findall("./devices/disk")
        assert len(disks) == 3 and all(d.find("readonly") is not None for d in disks)
        # and the master's own overlay holds not one byte of its own after three boots and a run
        extents = json.loads(subprocess.run(
            ["qemu-img", "map", "-U", "--output=json", master.disk],
            capture_output=True, text=True, check=True).stdout)  # fmt: skip
        own = [e for e in extents if e.get("data") and e.get("depth", 0) == 0]
        assert own == [], own[:5]
    finally:
        down = gcvm_env.gcvm("down", "--name", name, timeout=300)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)
