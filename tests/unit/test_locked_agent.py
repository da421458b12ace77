"""The locked master's job agent, attacked from the host's side: every way a job could carry
host-chosen code, a host-chosen trust anchor or a path outside the agent's folders is refused;
what a master needs runs. The server is real (loopback sockets), the job a real `launch`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from groupcover.agent import jobs as agent_jobs
from groupcover.agent import server as agent_server
from groupcover.agent.jobs import JobRefused, check_job
from orchestrator import agentclient
from orchestrator.errors import RemoteError

REPO = Path(__file__).resolve().parents[2]
GOOD = ["launch", "--role", "master", "--rank", "0", "--world-size", "2", "--worker", "1",
        "--master-addr", "10.1.2.11", "--master-port", "29500", "--ifname", "enp1s0",
        "--model", "/var/lib/gcvm/packages/pkg-1", "--broker", "https://10.1.2.1:8443",
        "--tee", "none", "--modes", "groupcover,hardened", "--batch", "1", "--seq", "16",
        "--repeat", "2", "--warmup", "0", "--threads", "1", "--json",
        "/var/tmp/gcvm-results/20261207T000000Z/m0.json", "--audit", "--mask-budget", "none",
        "--transport", "tcp", "--timeout", "600"]  # fmt: skip


def with_args(*replace: str, drop: str | None = None) -> list[str]:
    argv = list(GOOD)
    if drop is not None:
        i = argv.index(drop)
        del argv[i : i + 2]
    return argv + list(replace)


def test_the_master_rank_of_a_run_is_accepted() -> None:
    job = check_job(
        {"argv": GOOD, "env": {"PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}}
    )
    assert job.results == PurePosixPath("/var/tmp/gcvm-results/20261207T000000Z/m0.json")
    assert check_job({"argv": with_args("--model", "seed-transformer",
                                        drop="--model")}).argv[0] == "launch"  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (with_args("--broker-cert", "/tmp/impostor.pem"), "measured command line"),
        (with_args("--broker-cert=/tmp/impostor.pem"), "measured command line"),
        (with_args("--owner-key", "/tmp/host.pub"), "measured command line"),
        (with_args("--key-file", "/tmp/model.key"), "only from the key broker"),
        (with_args("--no-verify"), "always checks"),
        (with_args("--seed", "7"), "predict the masks"),
        (with_args("--no-ver"), "whole names only"),  # argparse would take the abbreviation
        (with_args("--transport", "torch-rpc", drop="--transport"), "not one of tcp"),
        (with_args("--package", "/var/lib/gcvm/packages/pkg-1"), "the worker's"),
        (with_args("--model", "/var/lib/gcvm/packages/../../../etc", drop="--model"), "NAME"),
        (with_args("--model", "/opt/evil", drop="--model"), "NAME"),
        (with_args("--model", "../evil", drop="--model"), "built-in model"),
        (with_args("--json", "/etc/cron.d/x.json", drop="--json"), "RUN/NAME.json"),
        (with_args("--json", "/var/tmp/gcvm-results/../x/y.json", drop="--json"), "RUN/NAME"),
        (with_args("--broker", "https://x;rm -rf /", drop="--broker"), "URL"),
        (with_args("--modes", "--no-verify", drop="--modes"), "needs a value"),
        (with_args("--ifname", "eth0\nx", drop="--ifname"), "control characters"),
        (with_args("--role", "worker", drop="--role"), "not one of master"),
        (with_args("--exec", "sh"), "whole names only"),
        ([a for a in GOOD if a not in ("--role", "master")], "--role master is required"),
        (["bench", "--local"], "runs `launch` only"),
        (["attack"], "runs `launch` only"),
        (["protect", "--out", "/tmp/x"], "runs `launch` only"),
    ],
)
def test_a_job_that_reaches_past_the_master_rank_is_refused(argv: list[str], said: str) -> None:
    with pytest.raises(JobRefused) as caught:
        check_job({"argv": argv})
    assert said in str(caught.value)


@pytest.mark.parametrize(
    "env",
    [
        {"PYTHONPATH": "/tmp/evil"},
        {"LD_PRELOAD": "/tmp/evil.so"},
        {"PATH": "/tmp"},
        {"OMP_NUM_THREADS": "1; sh"},
        {"PYTHONSTARTUP": "/tmp/x.py"},
    ],
)
def test_the_environment_is_the_agents_own(env: dict[str, str]) -> None:
    with pytest.raises(JobRefused):
        check_job({"argv": GOOD, "env": env})


def test_a_job_is_an_object_with_argv_and_env_only() -> None:
    for document in (["launch"], {"argv": GOOD, "shell": "sh"}, {"argv": "launch --role master"},
                     {"argv": [1, 2]}):  # fmt: skip
        with pytest.raises(JobRefused):
            check_job(document)


def test_host_and_guest_agree_on_port_roots_and_job_env() -> None:
    from orchestrator import packages

    assert agentclient.PORT == agent_server.PORT
    assert agentclient.RESULTS_ROOT == agent_jobs.RESULTS_ROOT
    assert PurePosixPath(packages.GUEST_ROOT) == agent_jobs.PACKAGES_ROOT
    assert set(agent_jobs.ENV) == agentclient.JOB_ENV


@pytest.fixture
def agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[agentclient.LockedGuest, Path, Path]]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    packages, results = tmp_path / "packages", tmp_path / "results"
    server = agent_server.make_server(agent_server.Agent(packages, results), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            agentclient.LockedGuest("m0", "127.0.0.1", None, server.server_address[1]),
            packages,
            results,
        )
    finally:
        server.shutdown()
        server.server_close()
        for job in server.RequestHandlerClass.agent.jobs.values():  # type: ignore[attr-defined]
            job.stop()


Agent = tuple[agentclient.LockedGuest, Path, Path]


def test_package_files_land_in_the_package_root_only(agent: Agent, tmp_path: Path) -> None:
    guest, packages, _ = agent
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    assert guest.put_package_file("pkg-1", manifest)["bytes"] == 2
    assert (packages / "pkg-1" / "manifest.json").read_text() == "{}"
    for path in ("/packages/pkg-1/model.key", "/packages/pkg-1/evil.py",
                 "/packages/../x/manifest.json", "/packages/.hidden/manifest.json",
                 "/packages/a/b/manifest.json"):  # fmt: skip
        with pytest.raises(RemoteError):
            guest.request("PUT", path, b"x")
    assert sorted(p.name for p in packages.rglob("*")) == ["manifest.json", "pkg-1"]


def test_no_command_reaches_a_locked_master(
    agent: tuple[agentclient.LockedGuest, Path, Path],
) -> None:
    guest, _, _ = agent
    for argv in (["sh", "-c", "id"], ["mkdir", "-p", "/root/.ssh"], ["cat", "/proc/cmdline"]):
        with pytest.raises(agentclient.LockedMaster, match="locked master"):
            guest.run(argv, timeout=5)
    for method, path in (
        ("POST", "/exec"),
        ("GET", "/files/etc/shadow"),
        ("GET", "/results/../../etc/shadow"),
    ):
        with pytest.raises(RemoteError):
            guest.request(method, path, {"argv": ["sh"]} if method == "POST" else None)
    with pytest.raises(RemoteError, match="runs `launch` only"):
        guest.request("POST", "/jobs", {"argv": ["bench", "--local"]})


def test_a_job_runs_the_framework_and_its_results_come_back(
    agent: tuple[agentclient.LockedGuest, Path, Path], tmp_path: Path
) -> None:
    guest, _, results = agent
    health = guest.health()
    assert health["agent"] == "gcvm locked master" and health["busy"] is False
    lines: list[str] = []
    # a mode the agent lets through (a name) and the framework itself refuses: the real
    # framework ran, and its one-line answer came back
    argv = ["python3", "-m", "groupcover", "launch", "--role", "master", "--rank", "0",
            "--world-size", "2", "--worker", "1", "--master-addr", "127.0.0.1",
            "--master-port", "1", "--modes", "no-such-mode", "--timeout", "1"]  # fmt: skip
    job = guest.start(argv, {"PYTHONUNBUFFERED": "1", "PATH": "/tmp/ignored"}, lines.append)
    with pytest.raises(RemoteError, match="one at a time"):
        guest.start(argv)
    rc = job.wait(120)
    assert rc == 2 and any("no-such-mode" in line for line in lines), lines
    assert job.tail(5)
    run = results / "20261207T000000Z"
    run.mkdir(parents=True)
    (run / "m0.json").write_text(json.dumps({"ok": True}))
    guest.get(f"{agentclient.RESULTS_ROOT}/20261207T000000Z/m0.json", tmp_path / "m0.json")
    assert json.loads((tmp_path / "m0.json").read_text()) == {"ok": True}
    # a second job may start once the first exited, and kill stops it
    job2 = guest.start(argv)
    job2.kill()
    deadline = time.monotonic() + 30
    while guest.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not guest.health()["busy"]


def test_the_exit_status_comes_after_the_last_line(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """A follower stops at the first view with a status and nothing new; the status must not
    be given while output is still unread. A reader slower than the job makes it so: the job
    has exited, its lines are still in the pipe."""
    import subprocess
    import sys

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    job = agent_jobs.Job(("launch", "--help"), (), None)
    expected = subprocess.run([sys.executable, "-P", "-s", "-m", "groupcover", *job.argv],
                              capture_output=True, text=True, env=agent_server.job_env(job),
                              check=True).stdout.splitlines()  # fmt: skip

    class SlowReader(agent_server.RunningJob):
        def _pump(self) -> None:
            self.proc.wait()  # the job is gone before a line is read
            super()._pump()

    running = SlowReader(1, job, agent_server.job_env(job), tmp_path)
    running.proc.wait()
    seen: list[str] = []
    while True:
        view = running.view(len(seen), wait=10)
        seen += view["lines"]
        if view["rc"] is not None and not view["lines"]:
            break
    assert view["rc"] == 0 and seen == expected and len(expected) > 20
