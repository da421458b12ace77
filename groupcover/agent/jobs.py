"""What a job sent to a locked master may say, checked before anything runs.

A job is `{"argv": [...], "env": {...}}`: the flags of `python -m groupcover launch` for the master
role and a few environment variables. The host chooses both, so both are untrusted:

- every flag is on an explicit allowlist with a check of its value (a flag argparse would accept
  by abbreviation, `--flag=value` of an unknown flag, a value that looks like a flag: refused);
- what decides trust is never a flag: the broker's certificate and the owner's key come only
  from the measured command line (`--broker-cert`, `--owner-key` refused), keys only from the
  broker (`--key-file` refused), results are always checked (`--no-verify` refused), secrets and
  masks come from the OS (`--seed`, which makes them reproducible for benchmarks, refused), and the
  wire is the tensor-only TCP transport (`--transport torch-rpc` lets the worker run code in the
  master: refused);
- paths point inside the agent's own folders: a package folder under the package root (one name,
  no separators), the results file under the results root;
- the environment is an allowlist too; PATH, PYTHONPATH and the rest are the agent's own.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

PACKAGES_ROOT = PurePosixPath("/var/lib/gcvm/packages")
RESULTS_ROOT = PurePosixPath("/var/tmp/gcvm-results")
MAX_ARGV = 200
MAX_VALUE = 512

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}")
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
URL_RE = re.compile(r"(https?)://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
MODES_RE = re.compile(r"[a-z0-9-]+(,[a-z0-9-]+){0,31}")
BUDGET_RE = re.compile(r"none|[0-9]{1,7}(\.[0-9]{1,3})?")
FLOAT_RE = re.compile(r"[0-9]{1,7}(\.[0-9]{1,3})?")


class JobRefused(ValueError):
    """The job is not one a locked master runs; the message says which part and why."""


@dataclass(frozen=True)
class Job:
    argv: tuple[str, ...]  # after `python -m groupcover`
    env: tuple[tuple[str, str], ...]
    results: PurePosixPath | None  # the --json file, inside RESULTS_ROOT


def _int(low: int, high: int) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not re.fullmatch(r"[0-9]{1,9}", value) or not low <= int(value) <= high:
            raise JobRefused(f"not an integer in [{low}, {high}]: {value!r}")

    return check


def _choice(*allowed: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in allowed:
            raise JobRefused(f"{value!r} is not one of {', '.join(allowed)}")

    return check


def _match(pattern: re.Pattern[str], what: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not pattern.fullmatch(value):
            raise JobRefused(f"not {what}: {value!r}")

    return check


def _host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOST_RE.fullmatch(value):
            raise JobRefused(f"not an address or host name: {value!r}") from None


def _model(value: str, root: PurePosixPath) -> None:
    """A package folder under the package root, or a built-in model's name (no path at all)."""
    path = PurePosixPath(value)
    if path.is_absolute():
        if path.parent != root or not NAME_RE.fullmatch(path.name):
            raise JobRefused(f"a package folder is {root}/NAME: {value!r}")
    elif not NAME_RE.fullmatch(value) or "." in value:
        raise JobRefused(f"not a built-in model name: {value!r}")


def _results(value: str, root: PurePosixPath) -> None:
    path = PurePosixPath(value)
    parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
    if len(parts) != 2 or not all(NAME_RE.fullmatch(p) for p in parts) or path.suffix != ".json":
        raise JobRefused(f"the results file is {root}/RUN/NAME.json: {value!r}")


def _placeholder(value: str) -> None:  # checked against the agent's roots in _check_flags
    raise AssertionError(value)


# flag -> check of its value (None: a flag without a value)
FLAGS: dict[str, Callable[[str], None] | None] = {
    "--role": _choice("master"),
    "--rank": _int(0, 4095),
    "--world-size": _int(2, 4096),
    "--worker": _int(0, 4095),
    "--mask-worker": _int(0, 4095),
    "--master-addr": _host,
    "--master-port": _int(1, 65535),
    "--ifname": _match(IFNAME_RE, "an interface name"),
    "--force-tcp": None,
    "--model": _placeholder,
    "--broker": _match(URL_RE, "an http(s) URL of a host and port"),
    "--tee": _choice("none", "tdx", "sev-snp"),
    "--mask-budget": _match(BUDGET_RE, "MiB or none"),
    "--pool-compare": None,
    "--modes": _match(MODES_RE, "a comma-separated list of modes"),
    "--batch": _int(1, 1024),
    "--seq": _int(1, 512),
    "--repeat": _int(1, 100_000),
    "--warmup": _int(0, 100_000),
    "--threads": _int(1, 64),
    "--json": _placeholder,
    "--timeout": _match(FLOAT_RE, "seconds"),
    "--audit": None,
    "--audit-forwards": _int(1, 100_000),
    "--verify": None,
    "--transport": _choice("tcp"),
}

# Flags the framework has that a locked master refuses, and why (the host chooses argv).
REFUSED: dict[str, str] = {
    "--broker-cert": "the broker's certificate comes only from the measured command line",
    "--owner-key": "the owner's key comes only from the measured command line",
    "--key-file": "a locked master takes model keys only from the key broker",
    "--no-verify": "a locked master always checks the worker's results",
    "--seed": "a locked master's secrets and masks come from the OS: a seed the host chose would "
    "let the worker predict the masks",
    "--package": "a locked VM is a master; --package is the worker's",
    "--published": "a locked VM is a master; --published is the worker's",
}

# Environment variables a job may set, each checked; every other is the agent's own.
ENV: dict[str, Callable[[str], None]] = {
    "PYTHONUNBUFFERED": _choice("1"),
    "TORCH_CPP_LOG_LEVEL": _choice("ERROR", "WARNING", "INFO"),
    "OMP_NUM_THREADS": _int(1, 64),
    "GLOO_SOCKET_IFNAME": _match(IFNAME_RE, "an interface name"),
    "TP_SOCKET_IFNAME": _match(IFNAME_RE, "an interface name"),
}


def check_job(document: object, packages_root: PurePosixPath = PACKAGES_ROOT,
              results_root: PurePosixPath = RESULTS_ROOT) -> Job:  # fmt: skip
    """The job a locked master runs from `document` (parsed JSON), or JobRefused."""
    if not isinstance(document, Mapping) or set(document) - {"argv", "env"}:
        raise JobRefused('a job is {"argv": [...], "env": {...}} and nothing else')
    argv, env = document.get("argv"), document.get("env", {})
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise JobRefused("argv is a list of strings")
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise JobRefused("env maps names to strings")
    if not argv or argv[0] != "launch":
        raise JobRefused(f"a locked master runs `launch` only, not {argv[:1]}")
    if len(argv) > MAX_ARGV:
        raise JobRefused(f"more than {MAX_ARGV} arguments")
    results = _check_flags(argv[1:], packages_root, results_root)
    for name, value in env.items():
        check = ENV.get(name)
        if check is None:
            raise JobRefused(f"environment variable {name} is the agent's own")
        try:
            check(value)
        except JobRefused as exc:
            raise JobRefused(f"{name}: {exc}") from None
    return Job(tuple(argv), tuple(sorted(env.items())), results)


def _check_flags(args: Sequence[str], packages_root: PurePosixPath,
                 results_root: PurePosixPath) -> PurePosixPath | None:  # fmt: skip
    seen_role = False
    results = None
    i = 0
    while i < len(args):
        flag = args[i]
        if any(ord(c) < 0x20 or c == "\x7f" for c in flag) or len(flag) > MAX_VALUE:
            raise JobRefused("an argument holds control characters or is too long")
        name = flag.split("=", 1)[0]
        if name in REFUSED:
            raise JobRefused(f"{name} is refused: {REFUSED[name]}")
        if flag not in FLAGS:
            raise JobRefused(f"{flag!r} is not a flag a locked master takes (whole names only)")
        check = FLAGS[flag]
        i += 1
        if check is None:
            continue
        if i >= len(args) or args[i].startswith("-"):
            raise JobRefused(f"{flag} needs a value")
        value = args[i]
        if len(value) > MAX_VALUE or any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise JobRefused(f"{flag}: the value holds control characters or is too long")
        try:
            if flag == "--model":
                _model(value, packages_root)
            elif flag == "--json":
                _results(value, results_root)
            else:
                check(value)
        except JobRefused as exc:
            raise JobRefused(f"{flag}: {exc}") from None
        if flag == "--role":
            seen_role = True
        elif flag == "--json":
            if results is not None:
                raise JobRefused("--json given twice")
            results = PurePosixPath(value)
        i += 1
    if not seen_role:
        raise JobRefused("--role master is required")
    return results
