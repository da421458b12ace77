"""`gcvm run bench` settings: validated before anything is started, and turned into the flags
of the framework's entry point (`python -m groupcover launch`)."""

from __future__ import annotations

import pytest

from orchestrator.errors import UsageError
from orchestrator.run.settings import BenchSettings


def test_launch_args_carry_the_workload_and_force_tcp_between_vms() -> None:
    s = BenchSettings(model="bert-base", modes=("groupcover",), batch=2, seq=16, repeat=3)
    args = s.launch_args("/var/tmp/r/m0.json", threads=1, model_args=("--model", "/p/x"))
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert flags["--model"] == "/p/x" and flags["--modes"] == "groupcover"  # a package folder
    assert (flags["--batch"], flags["--seq"], flags["--repeat"]) == ("2", "16", "3")
    assert "--force-tcp" in args and "--audit" in args and "--verify" in args
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


# The framework's argv as the orchestrator produced it before its settings were declared in one
# table (captured from that code): the declarations must give exactly these. One change since:
# checking results is the default, and the choice is always written (--verify or --no-verify).
GOLDEN_ARGV = [
    (
        {},
        ("/var/tmp/gcvm-results/r/master0.json", 2, ("--model", "/var/tmp/gcvm-packages/p")),
        ("--model", "/var/tmp/gcvm-packages/p", "--modes", "plain-offload,groupcover",
         "--batch", "8", "--seq", "128", "--repeat", "5", "--warmup", "1", "--threads", "2",
         "--timeout", "600", "--force-tcp", "--audit", "--verify",
         "--json", "/var/tmp/gcvm-results/r/master0.json"),
    ),
    (
        {"model": "bert-base", "modes": ("tee-only", "hardened"), "batch": 3, "seq": 17,
         "repeat": 9, "warmup": 0, "seed": 42, "audit": False, "verify": True,
         "rpc_timeout": 99.7},
        (None, 4, ("--package", "/x")),
        ("--package", "/x", "--modes", "tee-only,hardened", "--batch", "3", "--seq", "17",
         "--repeat", "9", "--warmup", "0", "--threads", "4", "--timeout", "99", "--force-tcp",
         "--seed", "42", "--verify"),
    ),
    (
        {"audit": True, "verify": True, "seed": 0},
        (None, 1, ()),
        ("--modes", "plain-offload,groupcover", "--batch", "8", "--seq", "128", "--repeat", "5",
         "--warmup", "1", "--threads", "1", "--timeout", "600", "--force-tcp", "--seed", "0",
         "--audit", "--verify"),
    ),
    (
        {"verify": False, "audit": False},
        (None, 1, ()),
        ("--modes", "plain-offload,groupcover", "--batch", "8", "--seq", "128", "--repeat", "5",
         "--warmup", "1", "--threads", "1", "--timeout", "600", "--force-tcp", "--no-verify"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "call", "argv"), GOLDEN_ARGV)
def test_launch_args_are_exactly_what_they_were(kwargs: dict, call: tuple, argv: tuple) -> None:
    assert BenchSettings(**kwargs).launch_args(*call) == argv


def test_transport_micro_client_flags_are_exactly_what_they_were() -> None:
    from orchestrator.run.micro import MICRO_SETTINGS
    from orchestrator.run.settings import framework_args

    s = BenchSettings(batch=4, seq=64, repeat=7, rpc_timeout=120.5)
    assert framework_args(s, MICRO_SETTINGS, threads=1) == [
        "--batch", "4", "--seq", "64", "--repeat", "7", "--threads", "1", "--timeout", "120",
    ]  # fmt: skip


def test_defaults_come_from_the_declarations() -> None:
    from dataclasses import fields

    from orchestrator.run.settings import SETTING

    s = BenchSettings()
    for f in fields(BenchSettings):
        if f.name != "keys":  # typer's default is a list; the settings hold a tuple
            assert getattr(s, f.name) == SETTING[f.name].parse(SETTING[f.name].default), f.name


def test_verb_options_come_from_the_declarations() -> None:
    """`run bench` and `run seed` parse their flags into the same settings."""
    from typer.testing import CliRunner

    from orchestrator import cli
    from orchestrator.run import bench

    seen: list[BenchSettings] = []
    runner = CliRunner()
    original = bench.run_bench
    try:
        bench.run_bench = lambda name, settings, out: seen.append(settings)  # type: ignore
        result = runner.invoke(cli.app, ["run", "bench", "--batch", "2", "--seq", "16",
                                         "--modes", "groupcover, hardened", "--no-audit",
                                         "--seed", "3", "--rpc-timeout", "30"])  # fmt: skip
        unchecked = runner.invoke(cli.app, ["run", "bench", "--no-verify"])
    finally:
        bench.run_bench = original
    assert result.exit_code == 0, result.output
    assert unchecked.exit_code == 0, unchecked.output
    assert seen == [BenchSettings(batch=2, seq=16, modes=("groupcover", "hardened"),
                                  audit=False, seed=3, rpc_timeout=30.0),
                    BenchSettings(verify=False)]  # fmt: skip
    assert seen[0].verify  # checking is the default


def test_run_seed_writes_the_check_choice_for_the_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's scripts check every result unless VERIFY=0; run seed writes it either way."""
    from typer.testing import CliRunner

    from orchestrator import cli
    from orchestrator.run import exec as run_exec_module

    seen: list[dict] = []
    monkeypatch.setattr(run_exec_module, "run_exec",
                        lambda *args, extra_env, **kw: seen.append(extra_env))  # fmt: skip
    runner = CliRunner()
    for argv in ([], ["--no-verify"]):
        result = runner.invoke(cli.app, ["run", "seed", *argv])
        assert result.exit_code == 0, result.output
    assert [env["VERIFY"] for env in seen] == ["1", "0"]
