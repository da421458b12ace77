"""The owner's identities and the pins the guests boot with: the orchestrator writes the same
kernel command line the framework reads, a cluster's VMs carry it, and a run with another owner
folder is refused before anything is protected."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from groupcover import trust
from orchestrator import ownerid
from orchestrator.cluster.backend import render_inputs
from orchestrator.errors import GcvmError


def test_the_pins_the_orchestrator_writes_are_what_the_master_reads(tmp_path: Path) -> None:
    ident = ownerid.ensure(tmp_path / "owner")
    line = f"root=/dev/vda rw console=ttyS0 {ident.cmdline}"
    pins = trust.parse_cmdline(line)
    assert pins.broker_cert == ident.broker_cert and pins.owner_key == ident.owner_key
    assert pins.measured
    assert ident.cmdline == trust.cmdline_params(ident.broker_cert, ident.owner_key)
    # the same pins where the framework reads files given on its command line
    assert trust.read_owner_key(ident.signing_pub) == ident.owner_key
    assert trust.read_broker_cert(ident.broker_dir / "broker.pem") == ident.broker_cert


def test_identities_are_made_once_and_kept_private(tmp_path: Path) -> None:
    first = ownerid.ensure(tmp_path / "owner")
    again = ownerid.ensure(tmp_path / "owner")
    assert first == again
    assert stat.S_IMODE(first.signing_key.stat().st_mode) == 0o600
    first.signing_key.chmod(0o644)
    with pytest.raises(GcvmError, match="readable by others"):
        ownerid.ensure(tmp_path / "owner")


def test_the_domain_boots_with_the_pins(tmp_path: Path) -> None:
    ident = ownerid.ensure(tmp_path / "owner")
    image = SimpleNamespace(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd",
                            cmdline="root=/dev/vda rw console=ttyS0")  # fmt: skip
    host = SimpleNamespace(caps=None, accel="tcg", run_as=None)
    inputs = render_inputs(image, host, "net", ident.cmdline)  # type: ignore[arg-type]
    assert inputs.cmdline == f"root=/dev/vda rw console=ttyS0 {ident.cmdline}"
    assert trust.parse_cmdline(inputs.cmdline).owner_key == ident.owner_key


def test_a_run_with_another_owner_folder_is_refused(tmp_path: Path) -> None:
    from orchestrator.run.deploy import run_owner

    cluster = ownerid.ensure(tmp_path / "cluster-owner")
    st = SimpleNamespace(name="c", trust=cluster.facts())
    assert run_owner(st, None) == cluster.folder  # type: ignore[arg-type]
    assert run_owner(st, str(cluster.folder)) == cluster.folder  # type: ignore[arg-type]
    other = tmp_path / "other"
    ownerid.ensure(other)
    with pytest.raises(GcvmError, match="pin the identities of"):
        run_owner(st, str(other))  # type: ignore[arg-type]
