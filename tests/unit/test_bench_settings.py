"""`gcvm run bench` settings: validated before anything is started, and turned into the flags
of the framework's entry point (`python -m groupcover launch`)."""

from __future__ import annotations

import pytest

from orchestrator.bench import BenchSettings
from orchestrator.errors import UsageError


def test_launch_args_carry_the_workload_and_force_tcp_between_vms() -> None:
    s = BenchSettings(model="bert-base", modes=("groupcover",), batch=2, seq=16, repeat=3)
    args = s.launch_args("/var/tmp/r/m0.json", threads=1, model_args=("--model", "/p/x"))
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert flags["--model"] == "/p/x" and flags["--modes"] == "groupcover"  # a package folder
    assert (flags["--batch"], flags["--seq"], flags["--repeat"]) == ("2", "16", "3")
    assert "--force-tcp" in args and "--audit" in args
    assert args[-2:] == ("--json", "/var/tmp/r/m0.json")
    assert "--json" not in s.launch_args(None, threads=1)  # workers write nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "gpt"}, "unknown model"),
        ({"modes": ("groupcover", "fastest")}, "unknown mode(s) fastest"),
        ({"modes": ()}, "unknown mode(s) (none given)"),
        ({"batch": 0}, "--batch 0 is out of range"),
        ({"seq": 4096}, "--seq 4096 is out of range"),
        ({"port": 80}, "--port 80 is out of range"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        BenchSettings(**kwargs)
    assert message in err.value.message
    assert err.value.exit_code == 2


def test_ranks_masters_first_each_offloading_to_worker_i_mod_n(tmp_path) -> None:
    from orchestrator.spec import ClusterSpec, Role, plan_ranks, plan_vms

    vms = plan_vms(ClusterSpec(name="c", masters=3, workers=2), tmp_path)
    ifnames = {vm.name: f"enp{vm.rank}s0" for vm in vms}
    ranks = plan_ranks(vms, 29600, ifnames, extra=("--model", "minilm"))
    assert [(r.role, r.rank, r.worker) for r in ranks] == [
        (Role.master, 0, 3), (Role.master, 1, 4), (Role.master, 2, 3),
        (Role.worker, 3, None), (Role.worker, 4, None),
    ]  # fmt: skip
    assert {r.master_addr for r in ranks} == {vms[0].address}
    m1 = ranks[1]
    assert m1.argv("py")[:4] == ["py", "-m", "groupcover", "launch"]
    assert m1.argv("py")[-4:] == ["--worker", "4", "--model", "minilm"]
    assert m1.env() == {
        "RANK": "1", "WORLD_SIZE": "5", "WORKER": "4", "MASTER_ADDR": vms[0].address,
        "MASTER_PORT": "29600", "GLOO_SOCKET_IFNAME": "enp1s0", "TP_SOCKET_IFNAME": "enp1s0",
    }  # fmt: skip
    assert "WORKER" not in ranks[3].env()
