"""A run's settings are declared once on each side of the seam (`groupcover.settings` for the
framework's command line, `orchestrator.run.settings` for the run verbs): the framework's
workload flags are what its own parser reads back, and every flag the orchestrator writes for a
rank is one the framework's `launch` takes, with the orchestrator's ranges inside the framework's,
so a value the orchestrator accepted is never refused in a guest after the VMs are up."""

from __future__ import annotations

import argparse
import os

import pytest

from groupcover import settings as framework
from groupcover.__main__ import _build_parser
from orchestrator.run import settings as orchestrator
from orchestrator.run.settings import BenchSettings

RANK = ("launch", "--role", "master", "--rank", "0", "--world-size", "2", "--worker", "1")


def _workload_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    framework.add_workload(parser)
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--model", "/p/a", "--model", "/p/b", "--key-file", "/k/a", "--key-file", "/k/b",
         "--modes", "tee-only,hardened", "--batch", "3", "--seq", "17", "--seed", "0",
         "--audit", "--audit-forwards", "2", "--verify", "--mask-budget", "none",
         "--pool-compare", "--broker", "https://b:8443", "--tee", "snp", "--timeout", "9.5",
         "--transport", "torch-rpc", "--json", os.devnull, "--threads", "3"],
        ["--mask-budget", "12.5", "--repeat", "9", "--warmup", "0"],
        ["--no-verify"],
    ],
)  # fmt: skip
def test_the_workload_flags_parse_back_into_the_same_values(argv: list[str]) -> None:
    parser = _workload_parser()
    first = parser.parse_args(argv)
    again = parser.parse_args(list(framework.workload_argv(first)))
    assert vars(again) == vars(first)


def test_results_are_checked_unless_no_verify() -> None:
    parser = _workload_parser()
    assert parser.parse_args([]).verify is True
    assert parser.parse_args(["--verify"]).verify is True
    assert parser.parse_args(["--no-verify"]).verify is False
    assert "--verify" in framework.workload_argv(parser.parse_args([]))
    assert "--no-verify" in framework.workload_argv(parser.parse_args(["--no-verify"]))


def test_a_left_out_flag_is_not_written() -> None:
    args = _workload_parser().parse_args(["--timeout", "7"])
    written = framework.workload_argv(args, leave_out=("--timeout", "--transport"))
    assert "--timeout" not in written and "--transport" not in written


def test_every_flag_the_orchestrator_writes_is_one_the_framework_launch_takes() -> None:
    launch = _build_parser()
    extreme = BenchSettings(
        model="bert-base", modes=orchestrator.MODES, batch=1024, seq=512, repeat=10_000,
        warmup=0, seed=7, audit=True, verify=True, rpc_timeout=86_400,
    )  # fmt: skip
    for settings in (BenchSettings(), extreme, BenchSettings(verify=False)):
        # a results path the parser can check here (it checks a folder exists where it runs)
        argv = settings.launch_args(os.devnull, threads=2, model_args=("--model", "/p/x"))
        args = launch.parse_args([*RANK, *argv])  # an unknown flag exits 2 here
        assert args.batch == settings.batch and args.seq == settings.seq
        assert args.modes == settings.modes and args.repeat == settings.repeat
        assert args.audit == settings.audit and args.verify == settings.verify


def test_the_orchestrators_ranges_lie_inside_the_frameworks() -> None:
    bounded = {s.dest: s.bounds for s in framework.WORKLOAD if s.bounds is not None}
    checked = 0
    for setting in orchestrator.SETTINGS:
        flag = setting.framework
        dest = next((s.dest for s in framework.WORKLOAD if s.flag == flag), None)
        if setting.bounds is None or dest not in bounded:
            continue
        lo, hi = bounded[dest]
        assert lo <= setting.bounds[0] and setting.bounds[1] <= hi, (setting.name, flag)
        checked += 1
    assert checked >= 3  # batch, seq, repeat at least
