"""The bad-input table: what a careless operator types, the exit code and a fragment of the one
line that answers it. No VM, no daemon: every row is refused before anything is created.

Rows run in-process (`orchestrator.cli.main`, `groupcover.__main__.main`) in a private GCVM_HOME
and an empty image cache. Add a row whenever a new bad input gets a clear answer. `{tmp}`,
`{junk}`, `{vmdk}`, `{qcow2}`, `{zeros}` and `{plain}` in a row stand for files the fixture makes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
RDV = ["--master-addr", "127.0.0.1", "--master-port", "29999"]
MASTER = ["launch", "--role", "master", "--rank", "0", "--world-size", "2", "--worker", "1", *RDV]

# (argv, exit code, fragment of stderr); whitespace is compared collapsed (rich wraps lines)
GCVM: list[tuple[str, int, str]] = [
    # up: the cluster's shape
    ("up --workers 0", 2, "--workers must be at least 1"),
    ("up --masters 0", 2, "--masters must be at least 1"),
    ("up --workers 70", 2, "at most 64 VMs"),
    ("up --workers abc", 2, "Invalid value"),
    ("up --name Bad_Name", 2, "invalid cluster name 'Bad_Name'"),
    ("up --name aaaaaaaaaaaaaaaaaaaaa", 2, "invalid cluster name"),
    ("up --tee sgx", 2, "unknown --tee 'sgx'"),
    ("up --worker-tee foo", 2, "unknown --worker-tee 'foo'"),
    ("up --accel hvf", 2, "unknown --accel 'hvf'"),
    ("up --tee tdx --worker-tee sev-snp", 2, "mixes two vendors' TEEs"),
    ("up --vcpus 0", 2, "--vcpus must be at least 1"),
    # up: the host worker
    ("up --worker host --workers 2", 2, "--worker host with --workers 2: the host runs the one"),
    ("up --worker host --workers 1", 2, "leave out --workers"),
    ("up --worker gpu", 2, "unknown --worker 'gpu'"),
    ("up --worker-threads 2", 2, "--worker-threads is for --worker host"),
    ("up --worker host --worker-tee none", 2, "is a process, not a VM, and has no TEE"),
    ("up --worker host --worker-threads 0", 2, "--worker-threads 0 is out of range"),
    ("up --worker host --connect qemu:///system --network default", 2, "leave out --network"),
    ("run bench --masters 0", 2, "--masters 0 is out of range"),
    ("top --interval 0", 2, "--interval 0 is out of range"),
    ("up --memory 512", 2, "--memory 512 MiB is too small"),
    ("up --subnet nonsense", 2, "invalid --subnet 'nonsense'"),
    ("up --subnet 10.0.0.0/30", 2, "too few IPv4 addresses"),
    ("up --subnet fd00::/64", 2, "too few IPv4 addresses"),
    # up --runtime pods: refused before anything is made
    ("up --runtime kata", 2, "unknown --runtime 'kata'"),
    ("up --runtime pods --tee tdx", 2, "pods need a Kubernetes cluster with CoCo"),
    ("up --runtime pods --tee sgx", 2, "unknown --tee 'sgx'"),
    ("up --runtime pods --worker host", 2, "--worker host is for --runtime vms"),
    ("up --runtime pods --policy {tmp}/p.yaml", 2, "without --broker: the policy is the cluster"),
    ("up --runtime pods --broker --policy {tmp}/nosuch.yaml", 2, "no such file"),
    ("up --runtime pods --name Bad_Name", 2, "invalid cluster name 'Bad_Name'"),
    ("up --runtime pods --subnet 10.0.0.0/30", 2, "too few IPv4 addresses"),
    # up: time limits, daemons, networks, images
    ("up --timeout -5", 2, "--timeout -5 is out of range"),
    ("up --timeout 0", 2, "--timeout 0 is out of range"),
    ("up --timeout nan", 2, "--timeout nan is out of range"),
    ("up --connect bogus://x", 2, "names libvirt's 'bogus' driver"),
    ("up --connect qemu:///nowhere", 2, "path is /system or /session"),
    ("up --connect qemu+carrier://h/system", 2, "unknown libvirt transport 'carrier'"),
    ("up --network shared", 2, "--network shared needs --connect"),
    ("up --image {tmp}/nosuch.qcow2", 2, "no such file"),
    ("up --image {junk}", 2, "is not a disk image"),
    ("up --image {zeros}", 2, "is not a disk image"),
    ("up --image {vmdk}", 2, "is a vmdk image"),
    ("up --locked --image {qcow2}", 2, "locked masters boot gcvm's own image"),
    # down, status, ssh, logs, push: names and daemons
    ("down --name ..", 2, "invalid cluster name '..'"),
    ("down --name a/b", 2, "invalid cluster name"),
    ("down --connect bogus://x", 2, "names libvirt's 'bogus' driver"),
    ("status --name nosuch", 2, "no cluster named 'nosuch'"),
    ("status --name ../etc", 2, "invalid cluster name"),
    ("ssh master0 --name nosuch -- true", 2, "no cluster named 'nosuch'"),
    ("logs master0 --name nosuch", 2, "no cluster named 'nosuch'"),
    ("push --name nosuch", 2, "no cluster named 'nosuch'"),
    # run: the workload, checked before any VM is contacted
    ("run bench --name nosuch", 2, "no cluster named 'nosuch'"),
    ("run bench --model gpt", 2, "unknown model 'gpt'"),
    ("run bench --modes fastest", 2, "unknown mode(s) fastest"),
    ("run bench --modes ,", 2, "unknown mode(s) (none given)"),
    ("run bench --batch 0", 2, "--batch 0 is out of range"),
    ("run bench --seq 4096", 2, "--seq 4096 is out of range"),
    ("run bench --repeat 0", 2, "--repeat 0 is out of range"),
    ("run bench --port 80", 2, "--port 80 is out of range"),
    ("run bench --timeout -1", 2, "--timeout -1.0 is out of range"),
    ("run bench --rpc-timeout 5", 2, "--rpc-timeout 5.0 is out of range"),
    ("run exec --role boss -- true", 2, "unknown --role 'boss'"),
    ("run exec --timeout 0 -- true", 2, "--timeout 0 is out of range"),
    ("run exec", 2, "no command given"),
    ("run seed --set NOEQUALS", 2, "'NOEQUALS' is not KEY=VALUE"),
    ("run seed --set 1A=2", 2, "is not KEY=VALUE"),
    # render: refused before --out is made
    ("render --out {tmp}/out --workers 0", 2, "--workers must be at least 1"),
    ("render --out {tmp}/out --host-caps {tmp}/nosuch.xml", 2, "cannot read --host-caps"),
    ("render --out {tmp}/out --host-caps {junk}", 2, "not a libvirt domcapabilities document"),
    ("render --out {tmp}/out --tee tdx --host-caps {plain}", 2, "no TDX firmware (TDVF)"),
    ("render --out {tmp}/out --tee sev-snp --host-caps {plain}", 2, "no SEV cbitpos"),
    ("render --out {tmp}/out --tee tdx --accel tcg", 2, "--accel tcg cannot run a TEE guest"),
    ("render --out {tmp}/out --tee sgx", 2, "Invalid value"),
    ("render --out /proc/gcvm-nope --tee tdx", 2, "cannot write --out /proc/gcvm-nope"),
    ("doctor --connect bogus://x", 2, "names libvirt's 'bogus' driver"),
    # the image
    ("image info", 1, "no guest image for recipe"),
    ("nosuchcommand", 2, "No such command"),
]

# The framework's entry point (only inputs it already answers well; owned by the framework)
GROUPCOVER: list[tuple[str, int, str]] = [
    ("launch", 2, "--role"),
    ("launch --role boss", 2, "invalid choice: 'boss'"),
    ("launch --role master --rank x", 2, "invalid int value: 'x'"),
    (" ".join([*MASTER[:6], "1", *RDV]), 2, "--world-size 1 is out of range (at least 2)"),
    (" ".join(MASTER).replace("--rank 0", "--rank 5"), 2, "outside the world"),
    (" ".join(MASTER).replace("--worker 1", "--worker 0"), 2, "this master's own rank"),
    (" ".join([*MASTER, "--model", "gpt"]), 2, "unknown model 'gpt'"),
    (" ".join([*MASTER, "--modes", "fastest"]), 2, "unknown mode(s) fastest"),
    (" ".join([*MASTER, "--batch", "0"]), 2, "--batch 0 is out of range"),
    ("launch --role master --rank 0 --world-size 2 --worker 1", 2, "--master-addr"),
    ("bench", 2, "--local --micro"),
    ("bench --local --model gpt", 2, "unknown model 'gpt'"),
    ("bench --local --seq 0", 2, "--seq 0 is out of range"),
    ("bench --local --threads 0", 2, "--threads 0 is out of range (1..1024)"),
    ("bench --local --batch x", 2, "invalid int value: 'x'"),
    ("nosuch", 2, "invalid choice: 'nosuch'"),
    ("protect gpt --out /tmp/groupcover-no-such-package", 2, "unknown model 'gpt'"),
    ("protect gpt --out /nonexistent/pkg", 2, "--out /nonexistent/pkg: there is no folder"),
    ("protect bert-base --out /tmp/x --scheme soter", 2, "invalid choice: 'soter'"),
    ("protect bert-base --out /tmp/x --reference 8by128", 2, "is not BxS"),
    ("protect missing.py:make --out /tmp/x", 2, "no such model factory file"),
    ("bench --local --model minilm --key-file /tmp/k", 2, "is a built-in model, not a package"),
    ("bench --local --model minilm --broker http://127.0.0.1:1", 2, "--broker needs --tee"),
]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GCVM_CACHE", str(tmp_path / "cache"))  # no image built here
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not a disk\n" * 50)
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(1 << 20))
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    qcow2 = tmp_path / "cloud.qcow2"  # a disk image of the user's own (no dm-verity root)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    return {
        "qcow2": str(qcow2),
        "tmp": str(tmp_path),
        "junk": str(junk),
        "zeros": str(zeros),
        "vmdk": str(vmdk),
        "plain": str(FIXTURES / "domcaps-plain-debian12.xml"),
    }


def _argv(row: str, files: dict[str, str]) -> list[str]:
    argv = [word.format(**files) for word in row.split()]
    if argv[0] == "up" and "--name" not in argv:
        # namespaces and /run/gcvm are the host's: never meet someone's real `gcvm` cluster
        argv += ["--name", "badinput"]
    return argv


def _said(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("row", "code", "fragment"), GCVM, ids=[r for r, _, _ in GCVM])
def test_gcvm_refuses(
    row: str,
    code: int,
    fragment: str,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from orchestrator import cli

    monkeypatch.setattr(sys, "argv", ["gcvm", *_argv(row, files)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    said = _said(captured.err + captured.out)
    assert exited.value.code == code, said
    assert _said(fragment.format(**files)) in said
    assert "Traceback" not in said
    assert not (Path(files["tmp"]) / "out").exists()  # nothing was written
    # nothing under the state folder names a cluster
    clusters = Path(files["tmp"]) / "home" / "state" / "clusters"
    assert not list(clusters.glob("*/state.json"))


@pytest.mark.parametrize(
    ("row", "code", "fragment"), GROUPCOVER, ids=[r[:60] for r, _, _ in GROUPCOVER]
)
def test_groupcover_refuses(
    row: str, code: int, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from groupcover.__main__ import main

    try:
        rc = main(row.split())
    except SystemExit as exc:
        rc = exc.code
    said = _said(capsys.readouterr().err)
    assert rc == code, said
    assert fragment in said
    assert "Traceback" not in said


def test_the_table_is_long_enough() -> None:
    assert len(GCVM) + len(GROUPCOVER) >= 40
