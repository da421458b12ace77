"""The settings of a run, each declared once: its flag, default, help and checked range.

Every verb that takes a run's workload (`launch`, `bench`) gets its flags from `WORKLOAD`
(`add_workload`), `RankSettings` takes its defaults from here (`default`), and its validation
checks the declared ranges (`check_ranges`). A new setting is one more `Setting`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupcover.argtypes import int_in, output_file, positive_float
from groupcover.errors import UsageError
from groupcover.package.keys import TEES
from groupcover.rendezvous import DEFAULT_TIMEOUT_S

DEFAULT_MODEL = "minilm"
DEFAULT_MODES = ("plain-offload", "groupcover")
DEFAULT_MASK_BUDGET_MB = 256.0  # all masked modes' pools together (a package's master)
MAX_BATCH = 1024
MAX_SEQ = 512
MAX_THREADS = 1024
TRANSPORTS = ("tcp", "torch-rpc")  # the first is the default
DEFAULT_TRANSPORT = TRANSPORTS[0]


def parse_budget(text: str) -> float | None:
    """--mask-budget: MiB (finite, not negative), or none/unbounded."""
    if text.strip().lower() in ("none", "unbounded"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB or 'none'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--mask-budget {text} is not a number of MiB >= 0")
    return value


def parse_modes(text: str) -> tuple[str, ...]:
    """--modes: comma-separated."""
    return tuple(mode.strip() for mode in text.split(",") if mode.strip())


@dataclass(frozen=True)
class Setting:
    """One setting of a run: `flag` on the command line, `dest` in the parsed arguments (and
    the `RankSettings` field of the same name unless `field` says otherwise)."""

    flag: str
    dest: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    action: str | None = None  # "store_true", "append" or "bool" (--flag / --no-flag)
    bounds: tuple[int, int] | None = None  # a master's value must lie in lo..hi
    field: str | None = None
    render: Callable[[Any], str] = str  # a value as its flag's argument (`type` parses it back)
    none: str | None = None  # the argument that means None, where None is a choice, not unset

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        options: dict[str, Any] = {"dest": self.dest, "default": self.default, "help": self.help}
        if self.action == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif self.action is not None:
            options["action"] = self.action
        if self.bounds is not None:  # checked as it is parsed
            options["type"] = int_in(self.flag, *self.bounds)
        elif self.type is not None:
            options["type"] = self.type
        if self.choices is not None:
            options["choices"] = list(self.choices)
        parser.add_argument(self.flag, **options)

    def argv(self, value: Any) -> list[str]:
        """This setting's value back on a command line that `add_to`'s flag parses again."""
        if self.action == "store_true":
            return [self.flag] if value else []
        if self.action == "bool":  # always explicit: the other side's default may differ
            return [self.flag if value else "--no-" + self.flag.removeprefix("--")]
        if value is None:
            return [] if self.none is None else [self.flag, self.none]
        if self.action == "append":
            return [text for item in value for text in (self.flag, self.render(item))]
        return [self.flag, self.render(value)]


WORKLOAD: tuple[Setting, ...] = (
    Setting("--model", "models", None, action="append",
            help="a model package folder (see `protect`; repeatable: the modes are spread over "
            "the packages by scheme), or a built-in model: minilm, bert-base, seed-transformer, "
            f"resnet18 (protected on the fly); default {DEFAULT_MODEL}"),
    Setting("--key-file", "key_files", None, type=Path, action="append",
            help="(package) the model key file (repeatable: one per --model, in order)"),
    Setting("--broker", "broker", None,
            help="(package) release the model key from this KBS broker, http://HOST:PORT, or "
            "cdh:// for the Confidential Data Hub of the confidential pod this runs in"),
    Setting("--tee", "tee", None, choices=TEES,
            help="(with --broker) the evidence this guest gives; none: an insecure broker"),
    Setting("--broker-cert", "broker_cert", None, type=Path,
            help="(package) the broker's certificate (PEM/DER) to trust, where the measured "
            "boot pins none (a VM's kernel command line gcvm.broker_cert= wins; a different one "
            "is refused)"),
    Setting("--owner-key", "owner_key", None, type=Path,
            help="(package) the owner's Ed25519 public key (PEM) every package must be signed "
            "by, where the measured boot pins none (gcvm.owner_key= wins)"),
    Setting("--mask-budget", "mask_budget", DEFAULT_MASK_BUDGET_MB, type=parse_budget,
            none="none", field="mask_budget_mb",
            help="MiB of one-time masks drawn ahead, all masked modes together (packages; "
            "'none': one pair per layer and shape, unbounded)"),
    Setting("--pool-compare", "pool_compare", False, action="store_true",
            help="also run each masked mode with the unbounded mask pool, interleaved"),
    Setting("--modes", "modes", DEFAULT_MODES, type=parse_modes, render=",".join,
            help="comma-separated modes to run"),
    Setting("--batch", "batch", 8, type=int, bounds=(1, MAX_BATCH), help="samples per forward"),
    Setting("--seq", "seq", 128, type=int, bounds=(1, MAX_SEQ),
            help="sequence length (token models)"),
    Setting("--repeat", "repeat", 5, type=int, bounds=(1, 100_000),
            help="timed forwards per mode (interleaved)"),
    Setting("--warmup", "warmup", 1, type=int, bounds=(0, 100_000),
            help="untimed forwards per mode first"),
    Setting("--seed", "seed", None, type=int,
            help="secrets reproducible from this seed (benchmarks only: not secret); "
            "default: secrets from the OS"),
    Setting("--threads", "threads", 1, type=int, bounds=(1, MAX_THREADS),
            help="torch intra-op threads in each process"),
    Setting("--json", "json", None, type=output_file("--json"), field="json_path",
            help="where the master writes its results"),
    Setting("--timeout", "timeout", DEFAULT_TIMEOUT_S, type=positive_float("--timeout"),
            field="timeout_s", help="RPC and rendezvous timeout (s)"),
    Setting("--audit", "audit", False, action="store_true",
            help="check every payload the worker sees (untimed)"),
    Setting("--audit-forwards", "audit_forwards", 1, type=int, bounds=(1, 100_000),
            help="untimed forwards per mode the audit watches, before the timed ones"),
    Setting("--verify", "verify", True, action="bool",
            help="check every worker result with a secret random vector per layer (Freivalds; "
            "on by default, --no-verify: results NOT checked)"),
    Setting("--request-rate", "request_rate", None, type=positive_float("--request-rate"),
            help="also serve each mode a stream of requests arriving this many times a second "
            "(its mask pools refilled in the master's idle time) and report the rate served "
            "and the latency seen"),
    Setting("--transport", "transport", DEFAULT_TRANSPORT, choices=TRANSPORTS,
            help="tcp: tensors only, every reply checked (default); torch-rpc: the seed's "
            "torch.distributed.rpc, which lets the worker execute code in the master"),
)  # fmt: skip

_BY_FIELD = {setting.field or setting.dest: setting for setting in WORKLOAD}


def default(field: str) -> Any:
    """The declared default of a `RankSettings` field."""
    return _BY_FIELD[field].default


def add_workload(parser: argparse.ArgumentParser) -> None:
    """The workload flags, in their declared order (so --help lists them so)."""
    for setting in WORKLOAD:
        setting.add_to(parser)


def workload_argv(args: argparse.Namespace, leave_out: Sequence[str] = ()) -> tuple[str, ...]:
    """The workload of parsed arguments as flags again (a local run hands it to its master):
    what `add_workload` parses back into the same values; `leave_out` flags the caller gives."""
    chosen = (s for s in WORKLOAD if s.flag not in leave_out)
    return tuple(text for s in chosen for text in s.argv(getattr(args, s.dest)))


def check_ranges(values: Any) -> None:
    """Every bounded setting of `values` (a `RankSettings`) lies in its declared range."""
    for setting in WORKLOAD:
        if setting.bounds is None:
            continue
        lo, hi = setting.bounds
        value = getattr(values, setting.field or setting.dest)
        if not lo <= value <= hi:
            raise UsageError(f"{setting.flag} {value} is out of range ({lo}..{hi})")
