"""`gcvm eval security` hands its arguments to the framework's attack suite, in a process of its
own (the orchestrator never imports the framework), and passes its exit code on."""

from __future__ import annotations

import subprocess
import sys


def test_eval_security_passes_arguments_and_exit_code_through() -> None:
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "eval", "security",
            "--no-such-flag"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "groupcover: error: unrecognized arguments: --no-such-flag" in proc.stderr
    assert "Traceback" not in proc.stderr
