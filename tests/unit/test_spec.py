"""ClusterSpec validation, the per-VM plan, and the deterministic identities golden files need."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.spec import (
    MIN_MEMORY_MIB,
    Accel,
    ClusterSpec,
    Role,
    Tee,
    mac_for,
    plan_vms,
    stable_uuid,
)

CLUSTER_DIR = Path("/var/lib/gcvm/clusters/demo")


def test_enum_values_are_the_external_strings() -> None:
    assert Tee("sev-snp") is Tee.sev_snp
    assert [t.value for t in Tee] == ["none", "tdx", "sev-snp"]
    assert [a.value for a in Accel] == ["auto", "kvm", "tcg"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"workers": 0}, "--workers must be at least 1"),
        ({"masters": 0}, "--masters must be at least 1"),
        ({"vcpus": 0}, "--vcpus must be at least 1"),
        ({"memory_mib": MIN_MEMORY_MIB - 1}, "too small"),
        ({"name": "Bad_Name"}, "invalid cluster name"),
        ({"name": "x" * 21}, "invalid cluster name"),
        ({"subnet": "10.0.0.0/30"}, "too few IPv4 addresses"),
        ({"subnet": "nonsense"}, "invalid --subnet"),
        ({"workers": 64}, "at most 64 VMs"),
        ({"tee": Tee.tdx, "worker_tee": Tee.sev_snp}, "mixes two vendors"),
    ],
)
def test_bad_values_raise_usage_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        ClusterSpec(**kwargs)  # type: ignore[arg-type]
    assert needle in info.value.message
    assert info.value.exit_code == 2


def test_worker_tee_applies_to_workers_only() -> None:
    spec = ClusterSpec(name="demo", tee=Tee.tdx, worker_tee=Tee.none, workers=2)
    vms = plan_vms(spec, CLUSTER_DIR)
    assert [(vm.role, vm.tee) for vm in vms] == [
        (Role.master, Tee.tdx),
        (Role.worker, Tee.none),
        (Role.worker, Tee.none),
    ]
    assert spec.tees == (Tee.tdx, Tee.none)


def test_tee_applies_to_every_vm_by_default() -> None:
    spec = ClusterSpec(name="demo", tee=Tee.sev_snp, masters=2, workers=3)
    vms = plan_vms(spec, CLUSTER_DIR)
    assert {vm.tee for vm in vms} == {Tee.sev_snp}
    assert spec.tees == (Tee.sev_snp,)


def test_plan_is_deterministic_and_addresses_follow_ranks() -> None:
    spec = ClusterSpec(name="demo", masters=1, workers=4, subnet="192.168.122.0/24")
    first, second = plan_vms(spec, CLUSTER_DIR), plan_vms(spec, CLUSTER_DIR)
    assert first == second
    assert [vm.rank for vm in first] == [0, 1, 2, 3, 4]
    assert [vm.address for vm in first] == [f"192.168.122.{10 + i}" for i in range(5)]
    assert len({vm.mac for vm in first}) == len({vm.uuid for vm in first}) == 5
    worker = first[1]
    assert worker.name == "demo-worker0"
    assert worker.disk == CLUSTER_DIR / "disks" / "demo-worker0.qcow2"
    assert worker.seed == CLUSTER_DIR / "disks" / "demo-worker0-seed.iso"
    assert worker.serial_log == CLUSTER_DIR / "logs" / "demo-worker0.serial.log"


def test_mac_and_uuid_derivation() -> None:
    a, b = mac_for("192.168.122.10", "alpha"), mac_for("192.168.122.10", "beta")
    assert a.startswith("52:54:") and a.endswith(":7a:0a") and a != b  # the cluster's part
    assert mac_for("192.168.122.10", "alpha") == a  # deterministic
    assert int(a.split(":")[0], 16) & 0b11 == 0b10  # locally administered, unicast
    assert stable_uuid("a", "b") == stable_uuid("a", "b") != stable_uuid("a", "c")
