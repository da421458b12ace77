"""Failure paths of `up`, `down`, `run` and `render` that used to leave something behind or
report the wrong thing. Each runs against the fakes of test_cluster: no daemon, no VM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cluster, hostcaps, render, runbroker, state, tee
from orchestrator.cluster.parallel import _parallel, check
from orchestrator.errors import (
    HostUnsupported,
    HypervisorError,
    Interrupted,
    RemoteError,
    UsageError,
)
from orchestrator.hypervisor import Hypervisor
from orchestrator.image import user_image
from orchestrator.run import deploy, session
from orchestrator.run.bench import run_bench
from orchestrator.run.exec import run_exec
from orchestrator.run.settings import BenchSettings
from orchestrator.spec import Accel, ClusterSpec, Role, Tee
from tests.unit.test_cluster import FIXTURES, FakeBackend, _nothing_left


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    yield FakeBackend(tmp_path)


# --- run bench: ranks already started are stopped on any error --------------------------------


class FakeProc:
    def __init__(self) -> None:
        self.killed = False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True

    def tail(self, n: int) -> list[str]:
        return []


class FakeRemote:
    def __init__(self, name: str, fail_mkdir: bool) -> None:
        self.name = name
        self.fail_mkdir = fail_mkdir
        self.procs: list[FakeProc] = []
        self.closed = False

    def run(self, argv: list[str], **kwargs: Any) -> Any:
        if argv[0] == "mkdir" and self.fail_mkdir:
            raise RemoteError(f"{self.name}: mkdir failed (disk full)")

    def start(self, argv: list[str], **kwargs: Any) -> FakeProc:
        proc = FakeProc()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        self.closed = True


class FakeBroker:
    url = "http://192.0.2.1:1"
    insecure = True

    def __init__(self) -> None:
        self.stopped = False

    def start(self) -> FakeBroker:
        return self

    def stop(self) -> None:
        self.stopped = True

    def argv(self) -> list[str]:
        return ["gcvm", "broker", "serve"]


def test_run_bench_stops_started_ranks_on_any_error(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    st = cluster.up(ClusterSpec(name="rb"), backend=backend)
    remotes = {vm.name: FakeRemote(vm.name, fail_mkdir=vm.role == Role.master) for vm in st.vms}
    monkeypatch.setattr(session, "connect_all", lambda _st, _names=None: remotes)
    # no protect, copy or namespace here (tests/unit/test_packages.py has those): a fake broker
    monkeypatch.setattr(deploy, "prepare_packages", lambda _st, _s: ([], {"owner": str(tmp_path)}))
    monkeypatch.setattr(deploy, "copy_packages", lambda *_a: [])
    brokers: list[FakeBroker] = []
    monkeypatch.setattr(runbroker, "RunBroker", lambda *a, **k: brokers.append(FakeBroker()) or
                        brokers[-1])  # fmt: skip
    with pytest.raises(RemoteError, match="mkdir failed"):
        run_bench("rb", BenchSettings(batch=1, seq=8, repeat=1), tmp_path / "out")
    worker = remotes["rb-worker0"]
    assert worker.procs and all(p.killed for p in worker.procs)  # started first, then stopped
    assert all(r.closed for r in remotes.values())
    assert brokers and brokers[0].stopped  # the run's broker stops with it
    cluster.down("rb", backend=backend)


# --- up: a second Ctrl-C during cleanup does not cut the cleanup short --------------------------


def test_second_interrupt_during_cleanup_is_ignored(backend: FakeBackend) -> None:
    backend.interrupt_on_connect = True  # the first Ctrl-C, while waiting for SSH
    stop = backend.stop_daemon
    seen: list[str] = []

    def stop_and_interrupt(name: str) -> bool:
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of teardown
        time.sleep(0.1)
        seen.append("after the second Ctrl-C")
        return stop(name)

    backend.stop_daemon = stop_and_interrupt  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        cluster.up(ClusterSpec(name="ci"), backend=backend)
    assert seen == ["after the second Ctrl-C"]
    _nothing_left(backend, "ci")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


# --- up: the parallel steps' threads end before teardown starts --------------------------------


def test_parallel_waits_for_the_other_threads_after_a_failure() -> None:
    ended: list[str] = []

    def step(item: str) -> str:
        if item == "fails":
            raise RuntimeError("boom")
        try:
            for _ in range(200):  # a long step that checks for a cancel between its calls
                check(cancel)
                time.sleep(0.01)
            return item
        finally:
            ended.append(item)

    cancel = threading.Event()
    with pytest.raises(RuntimeError, match="boom"):
        _parallel(step, ["fails", "slow"], "t", cancel=cancel, grace=10)
    assert ended == ["slow"] and cancel.is_set()  # ended before the failure was raised


def test_a_start_in_flight_is_waited_for_so_teardown_sees_its_domain(
    backend: FakeBackend,
) -> None:
    real = backend.hv.start_domain

    def start(xml: str) -> str:
        if "-master0<" in xml:
            raise HypervisorError("libvirt failed to start domain ab-master0")
        time.sleep(0.5)  # still defining while the master's failure is raised
        return real(xml)

    backend.hv.start_domain = start  # type: ignore[method-assign]
    with pytest.raises(HypervisorError):
        cluster.up(ClusterSpec(name="ab"), backend=backend)
    time.sleep(0.7)  # a thread that was not waited for would define its domain now
    _nothing_left(backend, "ab")


# --- down --connect with the daemon down: nothing deleted, not a success -----------------------


def test_down_on_an_unreachable_shared_daemon_keeps_the_state(backend: FakeBackend) -> None:
    cluster.up(ClusterSpec(name="sd", connect="qemu:///system"), backend=backend)
    real = backend.open_hypervisor

    def down_daemon(uri: str) -> Hypervisor:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: Connection refused")

    backend.open_hypervisor = down_daemon  # type: ignore[method-assign]
    with pytest.raises(HypervisorError, match="nothing was removed") as err:
        cluster.down("sd", backend=backend)
    assert err.value.exit_code == 1 and err.value.hint and "gcvm down --name sd" in err.value.hint
    assert state.exists("sd") and len(backend.hv.cluster_domains("sd")) == 2
    backend.open_hypervisor = real  # type: ignore[method-assign]
    assert cluster.down("sd", backend=backend)
    assert backend.hv.domains() == [] and not state.exists("sd")


def test_down_without_state_on_an_unreachable_daemon_fails(backend: FakeBackend) -> None:
    def down_daemon(uri: str) -> Hypervisor:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: Connection refused")

    backend.open_hypervisor = down_daemon  # type: ignore[method-assign]
    with pytest.raises(HypervisorError, match="unreachable"):
        cluster.down("gone", connect="qemu:///system", backend=backend)


# --- --timeout is validated before anything is created ----------------------------------------


@pytest.mark.parametrize("value", [-5.0, 0.0, float("nan"), float("inf")])
def test_up_timeout_is_validated_first(backend: FakeBackend, value: float) -> None:
    with pytest.raises(UsageError, match=r"--timeout .* is out of range"):
        cluster.up(ClusterSpec(name="to"), backend=backend, timeout=value)
    _nothing_left(backend, "to")


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan")])
def test_bench_and_exec_timeouts_are_validated(value: float) -> None:
    with pytest.raises(UsageError, match="--timeout"):
        BenchSettings(timeout=value)
    with pytest.raises(UsageError, match="--timeout"):
        run_exec("nosuch", {Role.master: ["true"]}, port=29500, timeout=value)


# --- --image: junk is refused, real disks are taken -------------------------------------------


def test_image_that_is_not_a_disk_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a disk\n" * 100)
    with pytest.raises(UsageError, match="is not a disk image") as err:
        user_image(junk)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("offset", "magic", "kind"),
    [(510, b"\x55\xaa", "mbr"), (512, b"EFI PART", "gpt"), (1080, b"\x53\xef", "ext4")],
)
def test_raw_disks_with_a_partition_table_or_ext4_are_taken(
    tmp_path: Path, offset: int, magic: bytes, kind: str
) -> None:
    from orchestrator.image.signature import disk_signature

    disk = tmp_path / f"{kind}.raw"
    data = bytearray(1 << 20)
    data[offset : offset + len(magic)] = magic
    disk.write_bytes(bytes(data))
    assert disk_signature(disk) == kind
    assert user_image(disk).disk_format == "raw"


def test_qcow2_image_is_taken(tmp_path: Path) -> None:
    disk = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    assert user_image(disk).disk_format == "qcow2"


# --- render: a refusal leaves no --out behind; its hint names options that exist ---------------


def _plain_caps() -> hostcaps.HostCaps:
    return hostcaps.HostCaps.from_domcaps_xml((FIXTURES / "domcaps-plain-debian12.xml").read_text())


def test_render_refusal_leaves_no_out_folder(tmp_path: Path) -> None:
    spec = ClusterSpec(name="r", tee=Tee.tdx)
    inputs = render.RenderInputs(
        caps=_plain_caps(),
        accel=Accel.kvm,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline="console=ttyS0",
        network="gcvm-r",
    )
    out = tmp_path / "out"
    with pytest.raises(HostUnsupported) as err:
        render.render_cluster(spec, inputs, out)
    assert not out.exists()
    # the hint names only options that `gcvm render` has
    import re

    import typer.main

    from orchestrator.cli import app

    command = typer.main.get_command(app).commands["render"]  # type: ignore[attr-defined]
    options = {opt for param in command.params for opt in param.opts}
    gcvm_words = re.sub(r"`[^`]*`", "", err.value.hint or "")  # `virsh ...` is not gcvm's
    named = set(re.findall(r"--[a-z][a-z-]*", gcvm_words))
    assert named and named <= options, named - options


# --- misleading messages ----------------------------------------------------------------------


def test_accel_kvm_without_a_working_kvm_names_the_accelerator() -> None:
    from dataclasses import replace

    broken = replace(
        _plain_caps(), kvm_usable=False, kvm_reason="a test guest under KVM did not finish"
    )
    with pytest.raises(HostUnsupported) as err:
        tee.require(ClusterSpec(accel=Accel.kvm), broken)
    assert "--accel kvm" in err.value.message and "--tee" not in err.value.message
    assert err.value.hint and "--accel tcg" in err.value.hint and "--tee none" not in err.value.hint


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("bogus://x", "names libvirt's 'bogus' driver"),
        ("qemu", "is not a libvirt URI"),
        ("qemu+carrier://h/system", "unknown libvirt transport"),
        ("qemu:///nowhere", "path is /system or /session"),
    ],
)
def test_connect_uri_is_checked_before_connecting(uri: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as err:
        ClusterSpec(connect=uri)
    assert "CA certificate" not in err.value.message
    assert err.value.hint and "qemu:///system" in err.value.hint


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+ssh://root@h/system", "qemu:///session"])
def test_good_connect_uris_pass(uri: str) -> None:
    assert ClusterSpec(connect=uri).connect == uri


# --- Ctrl-C in any command ends with 130, not 0 -----------------------------------------------


def test_ctrl_c_in_a_command_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """typer (non-standalone) turns KeyboardInterrupt into a returned 130, which `main` dropped:
    an interrupted `gcvm run bench` exited 0."""
    import sys

    from orchestrator import cli

    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    monkeypatch.setattr(cluster, "status", interrupted)
    monkeypatch.setattr(sys, "argv", ["gcvm", "status", "--name", "any"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 130
    assert "interrupted" in capsys.readouterr().err
