"""`gcvm eval security`: the framework's security evaluation, run on this host.

The orchestrator never imports the framework: it starts `python -m groupcover attack` with the
interpreter gcvm runs under (the checkout's venv holds both halves) and passes the arguments on.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence

from orchestrator.errors import UsageError


def run_security(args: Sequence[str]) -> int:
    if importlib.util.find_spec("groupcover") is None or importlib.util.find_spec("torch") is None:
        raise UsageError(
            "the security evaluation needs the framework (groupcover and torch) on this host",
            hint="run `make setup`: it installs the framework into .venv",
        )
    argv = [sys.executable, "-m", "groupcover", "attack", *args]
    try:
        return subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
        return 130
