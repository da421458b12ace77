"""Bad input to `python -m groupcover` and the seed scripts: one error line (plus a hint) on
stderr, exit code 2, no traceback. Every case runs the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.transports import free_port, worker_argv

pytestmark = pytest.mark.slow  # every case starts real processes

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch_master(*extra: str, rank: int = 0, world: int = 2, worker: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "groupcover", "launch", "--role", "master", "--rank", str(rank),
        "--world-size", str(world), "--worker", str(worker), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--ifname", "lo", "--timeout", "20", *extra,
    ]  # fmt: skip


def _assert_clean_usage_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("groupcover: error: ")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0], errors[0]
    assert all(line.startswith("groupcover: ") for line in lines), proc.stderr


def _without_rendezvous() -> dict[str, str]:
    names = ("RANK", "WORLD_SIZE", "WORKER", "MASTER_ADDR", "MASTER_PORT", "TP_SOCKET_IFNAME",
             "GLOO_SOCKET_IFNAME")  # fmt: skip
    return {k: v for k, v in ENV.items() if k not in names}


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env or ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--model", "gpt5"), "unknown model 'gpt5'"),
        (("--modes", "plain-offload,fastest"), "unknown mode(s) fastest"),
        (("--batch", "0"), "--batch 0 is out of range"),
        (("--seq", "100000"), "--seq 100000 is out of range"),
        (("--repeat", "0"), "--repeat 0 is out of range"),
        (("--threads", "0"), "--threads 0 is out of range (1..1024)"),
        (("--timeout", "-1"), "--timeout -1 is not a finite positive number"),
    ],
)
def test_launch_rejects_bad_workload(extra: tuple[str, ...], needle: str) -> None:
    _assert_clean_usage_error(_run(_launch_master(*extra)), needle)


@pytest.mark.parametrize(
    ("rank", "world", "worker", "needle"),
    [
        (0, 2, 0, "worker rank 0 is this master's own rank"),
        (0, 2, 2, "worker rank 2 is outside the world"),
        (0, 2, -1, "worker rank -1 is outside the world"),
        (2, 2, 1, "rank 2 is outside the world"),
        (0, 1, 1, "--world-size 1 is out of range (at least 2)"),
    ],
)
def test_launch_rejects_bad_ranks(rank: int, world: int, worker: int, needle: str) -> None:
    _assert_clean_usage_error(_run(_launch_master(rank=rank, world=world, worker=worker)), needle)


def test_argument_errors_are_one_line() -> None:
    argv = [sys.executable, "-m", "groupcover", "launch", "--rank", "0"]
    _assert_clean_usage_error(_run(argv), "the following arguments are required: --role")
    argv = [sys.executable, "-m", "groupcover", "launch", "--role", "master", "--rank", "0"]
    _assert_clean_usage_error(
        _run(argv, _without_rendezvous()),
        "missing rendezvous setting(s): --world-size (or $WORLD_SIZE), --master-addr (or "
        "$MASTER_ADDR), --master-port (or $MASTER_PORT)",
    )
    argv = [sys.executable, "-m", "groupcover", "launch", "--role", "master", "--rank", "x"]
    _assert_clean_usage_error(_run(argv), "argument --rank: invalid int value: 'x'")
    argv = [sys.executable, "-m", "groupcover", "launch", "--role", "boss", "--rank", "0",
            "--world-size", "2", "--master-addr", "x", "--master-port", "1"]  # fmt: skip
    _assert_clean_usage_error(_run(argv), "invalid choice")


def test_bench_local_rejects_bad_input_before_starting_processes() -> None:
    argv = [sys.executable, "-m", "groupcover", "bench", "--local", "--model", "nope"]
    _assert_clean_usage_error(_run(argv), "unknown model 'nope'")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "WORKER": "1"}, "missing rendezvous variable(s)"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         "WORKER is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "WORKER": "0", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": "1"}, "worker rank 0 is this master's own rank"),
        ({"RANK": "0", "WORLD_SIZE": "2", "WORKER": "7", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": "1"}, "worker rank 7 is outside the world"),
        ({"RANK": "0", "WORLD_SIZE": "2", "WORKER": "1", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": "1", "BATCH": "0"}, "--batch 0 is out of range"),
        ({"RANK": "0", "WORLD_SIZE": "2", "WORKER": "one", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": "1"}, "WORKER='one' is not an integer"),
    ],
)  # fmt: skip
def test_seed_master_rejects_bad_environment(env: dict[str, str], needle: str) -> None:
    base = _without_rendezvous()
    script = os.path.join(os.path.dirname(sys.executable), "tee_test_transformer_master.py")
    _assert_clean_usage_error(_run([script], {**base, **env}), needle)


def test_seed_worker_needs_rendezvous_variables() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "tee_test_transformer_worker.py")
    base = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    _assert_clean_usage_error(
        _run([script], {**base, "RANK": "1", "WORLD_SIZE": "2"}),
        "missing rendezvous variable(s): MASTER_ADDR, MASTER_PORT",
    )


def test_target_that_is_a_master_is_refused_and_the_world_still_exits() -> None:
    """World of 3: master 0 wrongly names master 1 as its worker; master 1 uses worker 2."""
    port = free_port()
    common = ["--master-addr", "127.0.0.1", "--master-port", str(port), "--ifname", "lo",
              "--force-tcp", "--timeout", "30", "--world-size", "3"]  # fmt: skip
    base = [sys.executable, "-m", "groupcover", "launch"]
    workload = ["--model", "minilm", "--modes", "tee-only", "--batch", "1", "--seq", "8",
                "--repeat", "1", "--warmup", "0"]  # fmt: skip
    worker = subprocess.Popen(worker_argv(2, 3, port, 30.0), env=ENV)
    good = subprocess.Popen(
        [*base, "--role", "master", "--rank", "1", "--worker", "2", *common, *workload,
         "--json", os.devnull],
        env=ENV, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        bad = _run([*base, "--role", "master", "--rank", "0", "--worker", "1", *common, *workload])
        _assert_clean_usage_error(bad, "rank 1 is a master, not a worker")
        assert good.wait(timeout=120) == 0
        assert worker.wait(timeout=60) == 0
    finally:
        for proc in (good, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


NO_LAYER_MODEL = r"""
import sys, torch
from torch import nn
from groupcover.models import MODELS, ModelFactory
from groupcover.__main__ import main

class Pointwise(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2

def build(seed, **_):
    return Pointwise(), lambda batch, seq: (torch.randn(batch, seq),)

MODELS["pointwise"] = ModelFactory("no offloadable layer", build)
sys.exit(main(sys.argv[1:]))
"""


def test_model_without_offloadable_layer() -> None:
    """A built-in model is protected into a package before the master joins the world, so a
    model with nothing to offload fails there, at once, like any other bad model."""
    port = free_port()
    argv = [sys.executable, "-c", NO_LAYER_MODEL, "launch", "--role", "master", "--rank", "0",
            "--world-size", "2", "--worker", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--ifname", "lo", "--force-tcp", "--timeout", "30",
            "--model", "pointwise", "--modes", "plain-offload", "--batch", "1",
            "--seq", "4"]  # fmt: skip
    start = time.monotonic()
    _assert_clean_usage_error(_run(argv), "has no layer to offload")
    assert time.monotonic() - start < 25  # it never waited for a world


def test_launch_takes_the_seed_variables_when_flags_are_left_out(tmp_path: Path) -> None:
    """The worker gets only environment variables; the master mixes flags and variables."""
    env = {**_without_rendezvous(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    base = [sys.executable, "-m", "groupcover", "launch", "--timeout", "30"]
    worker = subprocess.Popen([*base, "--role", "worker"], env={**env, "RANK": "1"})
    try:
        master = _run([*base, "--role", "master", "--rank", "0", "--model", "minilm", "--modes",
                       "tee-only", "--batch", "1", "--seq", "8", "--repeat", "1",
                       "--json", str(tmp_path / "out.json")], {**env, "WORKER": "1"})  # fmt: skip
        assert master.returncode == 0, master.stderr
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    (result,) = json.loads((tmp_path / "out.json").read_text())["results"]
    assert (result["rank"], result["worker"]) == (0, 1)
