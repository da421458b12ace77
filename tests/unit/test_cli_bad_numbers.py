"""Bad numbers and output paths on every verb of `python -m groupcover`: exit 2 at once, one
`groupcover: error:` line (plus a hint), no traceback, before any work. A new user found
`bench --micro --batch 0` printing nonsense, `--threads 0` ending in a traceback and an unwritable
`--json` failing only after the run.

The cases run in one child process (torch is imported once), each through the real entry point
`groupcover.__main__.main` under an alarm: a case that starts working instead of refusing is cut
off and reported as such. One more case runs the real command line on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MASTER = ["launch", "--role", "master", "--rank", "0", "--world-size", "2", "--worker", "1",
          "--master-addr", "127.0.0.1", "--master-port", "29999"]  # fmt: skip
KEYRELEASE = ["keyrelease", "--broker", "http://127.0.0.1:1", "--tee", "none"]
NOWHERE = "{dir}/no-such-folder/out.json"  # in a folder that does not exist
# (argv, fragment of the error line); {dir} is a folder, {file} a file the fixture makes
CASES: list[tuple[list[str], str]] = [
    (["bench", "--micro", "--batch", "0"], "--batch 0 is out of range (1..1024)"),
    (["bench", "--micro", "--batch", "-3"], "--batch -3 is out of range"),
    (["bench", "--micro", "--seq", "-1"], "--seq -1 is out of range (1..512)"),
    (["bench", "--micro", "--repeat", "0"], "--repeat 0 is out of range"),
    (["bench", "--micro", "--threads", "0"], "--threads 0 is out of range"),
    (["bench", "--micro", "--threads", "-2"], "--threads -2 is out of range"),
    (["bench", "--micro", "--json", NOWHERE], "no-such-folder/out.json: there is no folder"),
    (["bench", "--micro", "--json", "{dir}"], "is a folder, not a file"),
    (["bench", "--micro", "--warmup", "-1"], "--warmup -1 is out of range"),
    (["bench", "--micro", "--timeout", "0"], "--timeout 0 is not a finite positive number"),
    (["bench", "--micro", "--timeout", "nan"], "--timeout nan is not a finite positive"),
    (["bench", "--micro", "--timeout", "inf"], "--timeout inf is not a finite positive"),
    (["bench", "--micro", "--mask-budget", "-5"], "--mask-budget -5 is not a number of MiB"),
    (["bench", "--micro", "--audit-forwards", "0"], "--audit-forwards 0 is out of range"),
    (["bench", "--transport-micro", "--batch", "0"], "--batch 0 is out of range"),
    (["bench", "--transport-micro", "--json", NOWHERE], "there is no folder"),
    (["bench", "--transport-micro", "--timeout", "-1"], "--timeout -1 is not a finite"),
    (["bench", "--transport-micro", "--target", "nonsense"], "--target 'nonsense' is not ADDR"),
    (["bench", "--local", "--seq", "-1"], "--seq -1 is out of range"),
    (["bench", "--local", "--json", "{dir}"], "is a folder, not a file"),
    ([*MASTER, "--threads", "0"], "--threads 0 is out of range"),
    ([*MASTER, "--timeout", "0"], "--timeout 0 is not a finite positive"),
    ([*MASTER, "--json", NOWHERE], "there is no folder"),
    ([*MASTER[:4], "-1", *MASTER[5:]], "--rank -1 is out of range"),
    ([*MASTER[:6], "1", *MASTER[7:]], "--world-size 1 is out of range"),
    ([*MASTER[:-1], "70000"], "--master-port 70000 is out of range (1..65535)"),
    (["protect", "minilm", "--out", "{dir}/no-such-folder/pkg"], "there is no folder"),
    (["protect", "minilm", "--out", "{file}"], "is a file, not a folder"),
    (["protect", "minilm", "--out", "{dir}/pkg", "--k", "0"], "--k 0 is out of range"),
    (["protect", "minilm", "--out", "{dir}/pkg", "--threads", "0"], "--threads 0 is out of"),
    (["protect", "minilm", "--out", "{dir}/pkg", "--key-out", "{dir}"], "is a folder"),
    (["attack", "--queries", "0"], "--queries 0 is out of range"),
    (["attack", "--seeds", "-1"], "--seeds -1 is out of range"),
    (["attack", "--steal-steps", "0"], "--steal-steps 0 is out of range"),
    (["attack", "--k", "0"], "--k 0 is out of range"),
    (["attack", "--k", ","], "--k ',' names no value"),
    (["attack", "--layers", "-1"], "--layers -1 is out of range"),
    (["attack", "--json", NOWHERE], "there is no folder"),
    (["attack", "--chart", "{dir}"], "is a folder, not a file"),
    (["frontier", "--block", "-1"], "--block -1 is out of range"),
    (["frontier", "--repeat", "0"], "--repeat 0 is out of range"),
    (["frontier", "--json", "{dir}"], "is a folder, not a file"),
    ([*KEYRELEASE, "--timeout", "0"], "--timeout 0 is not a finite positive"),
    ([*KEYRELEASE, "--timeout", "nan"], "--timeout nan is not a finite positive"),
    ([*KEYRELEASE, "--out", "{dir}"], "is a folder, not a file"),
    ([*KEYRELEASE, "--out", NOWHERE], "there is no folder"),
    (["standin", "--out", "{dir}/no-such-folder/standin"], "there is no folder"),
    (["standin", "--out", "{file}"], "is a file, not a folder"),
]
ALARM_S = 8  # a case still running after this started work instead of refusing
QUICK_S = 2.0  # a refusal at parse time takes milliseconds; slack for a loaded host

DRIVER = f"""
import contextlib, io, json, signal, sys, time
from groupcover.__main__ import main

class Overran(Exception):
    pass

def overran(*_):
    raise Overran

signal.signal(signal.SIGALRM, overran)
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    start = time.monotonic()
    signal.alarm({ALARM_S})
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
        how = "returned"
    except SystemExit as exc:
        code, how = exc.code, "exited"
    except Overran:
        code, how = None, "still running after {ALARM_S} s"
    except BaseException as exc:
        code, how = None, f"Traceback: {{type(exc).__name__}}: {{exc}}"
    finally:
        signal.alarm(0)
    results.append({{"code": code, "how": how, "err": err.getvalue(),
                     "seconds": time.monotonic() - start}})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    where = tmp_path_factory.mktemp("cli")
    (where / "a-file").write_text("not a folder\n")
    names = {"dir": str(where), "file": str(where / "a-file")}
    argvs = [[word.format(**names) for word in argv] for argv, _ in CASES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=where)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "index", range(len(CASES)), ids=[f"{a[0]} {' '.join(a[-2:])}" for a, _ in CASES]
)
def test_a_bad_number_or_path_is_refused_at_once(outcomes: list[dict], index: int) -> None:
    outcome, fragment = outcomes[index], CASES[index][1]
    said = outcome["err"]
    assert outcome["code"] == 2, f"{outcome['how']}, code {outcome['code']}: {said[-600:]}"
    assert "Traceback" not in said
    lines = [line for line in said.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("groupcover: error: ")]
    assert len(errors) == 1, said
    assert fragment in errors[0], errors[0]
    assert all(line.startswith("groupcover: ") for line in lines), said
    assert outcome["seconds"] < QUICK_S, outcome


def test_the_real_command_line_refuses_within_seconds(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "groupcover", "bench", "--micro", "--batch", "0"]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == ("groupcover: error: --batch 0 is out of range (1..1024)")
    assert proc.stderr.splitlines()[1].startswith("groupcover: hint: ")
    assert seconds < 20  # importing torch on a shared host; the bench itself never starts
