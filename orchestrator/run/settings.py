"""Every option of the run verbs, declared once: its flag, default, help, bounds and, for a
workload setting, the framework's flag (`python -m groupcover launch ... --batch 8 ...`).

From these declarations come the typer options of each verb (`options_of`, with a verb's own
default or help where it says something else), the validation of `BenchSettings` and the
framework's argv (`framework_args`). A new setting is one more `Setting` here (and a field of
`BenchSettings` when the framework takes it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import typer

from orchestrator.errors import UsageError
from orchestrator.spec import MAX_TIMEOUT_S

DEFAULT_PORT = 29500
# the framework's modes (groupcover.modes.MODES; a test keeps the two lists equal)
MODES = (
    "tee-only",
    "plain-offload",
    "mask-only",
    "groupcover",
    "groupcover-nomask",
    "hardened",
    "hardened-nomask",
    "groupcover-2w",
    "hardened-2w",
)
MODELS = ("minilm", "minilm-standin", "bert-base", "seed-transformer", "resnet18")


def _as_is(value: Any) -> Any:
    return value


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


@dataclass(frozen=True)
class Setting:
    """One option of the run verbs (`cli`), or a flag of the framework only (threads, TCP)."""

    name: str  # the verb's parameter, and the field of BenchSettings for a workload setting
    type: Any  # what typer parses the flag into
    default: Any
    help: str
    decls: tuple[str, ...] = ()  # the flag's spellings as typer takes them (default: --name)
    bounds: tuple[float, float] | None = None  # validated: lo <= value <= hi
    framework: str | None = None  # the framework's flag (`groupcover launch`)
    render: Callable[[Any], str] = str  # a value as the framework's argv carries it
    parse: Callable[[Any], Any] = _as_is  # the flag's value as BenchSettings holds it
    cli: bool = True  # False: no verb offers it; the orchestrator sets it per rank
    negation: str | None = None  # a bool's framework flag for False (None: the flag left out)

    @property
    def flag(self) -> str:
        return self.decls[0] if self.decls else "--" + self.name.replace("_", "-")

    def parameter(self) -> inspect.Parameter:
        """The typer option of a verb, as a parameter of its signature."""
        option = typer.Option(self.default, *self.decls, help=self.help)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                 annotation=self.type)  # fmt: skip


SETTINGS: tuple[Setting, ...] = (
    Setting("name", str, "gcvm", "Cluster name.", decls=("--name",)),
    Setting(
        "model",
        str,
        "minilm",
        "A built-in model (minilm, bert-base, seed-transformer, resnet18: protected on "
        "this host into the cluster's state folder, keys into the owner folder), or model "
        "package folder(s) DIR[,DIR..] from `gcvm model protect`, used as they are.",
    ),
    Setting(
        "keys",
        list[Path],
        [],
        "A given package's model key (repeatable, in --model's order; "
        "default DIR/model.key). It stays on this host: the broker releases it.",
        decls=("--key",),
        parse=lambda keys: tuple(str(k) for k in keys),
    ),
    Setting(
        "owner",
        Path | None,
        None,
        "The owner folder for keys made here and the broker's log "
        "(default /var/lib/gcvm/owner/<cluster>/).",
        decls=("--owner",),
        parse=_str_or_none,
    ),
    Setting(
        "policy",
        Path | None,
        None,
        "The broker's policy file (needed with --tee snp/tdx clusters).",
        decls=("--policy",),
        parse=_str_or_none,
    ),
    Setting(
        "modes",
        str,
        "plain-offload,groupcover",
        "Comma-separated: tee-only, plain-offload, mask-only, groupcover, "
        "groupcover-nomask, hardened, hardened-nomask.",
        framework="--modes",
        render=",".join,
        parse=lambda modes: tuple(m.strip() for m in modes.split(",") if m.strip()),
    ),
    Setting(
        "batch",
        int,
        8,
        "Batch size (real samples per forward).",
        bounds=(1, 1024),
        framework="--batch",
    ),
    Setting(
        "seq",
        int,
        128,
        "Sequence length (image side for resnet18).",
        bounds=(1, 512),
        framework="--seq",
    ),
    Setting("repeat", int, 5, "Timed forwards per mode.", bounds=(1, 10_000), framework="--repeat"),
    Setting("warmup", int, 1, "Untimed forwards per mode first.", framework="--warmup"),
    Setting(
        "threads",
        int,
        None,
        "A rank's threads: its VM's vCPUs, or the host worker's.",
        framework="--threads",
        cli=False,
    ),
    Setting(
        "timeout",
        float,
        3600.0,
        "Seconds before the whole run is stopped.",
        bounds=(1, MAX_TIMEOUT_S),
    ),
    Setting(
        "rpc_timeout",
        float,
        600.0,
        "Seconds each rank waits for the world to assemble and for each worker call.",
        bounds=(10, 86_400),
        framework="--timeout",
        render=lambda seconds: str(int(seconds)),
    ),
    # VM to VM: TCP only. TensorPipe's shared-memory transport is useless across machines and
    # its reactor thread spins, taking a third of a guest's vCPU.
    Setting(
        "force_tcp", bool, True, "Every transport over TCP.", framework="--force-tcp", cli=False
    ),
    Setting(
        "seed",
        int | None,
        None,
        "Make the secrets reproducible from this seed (benchmarks only: then not secret). "
        "Default: every secret from the guest's CSPRNG.",
        framework="--seed",
    ),
    Setting(
        "audit",
        bool,
        True,
        "Inspect every payload sent to a worker for secrets.",
        framework="--audit",
    ),
    Setting(
        "verify",
        bool,
        True,
        "Check every worker result with a secret random vector per layer (Freivalds); "
        "--no-verify: results are NOT checked.",
        framework="--verify",
        negation="--no-verify",  # written either way: the guest's default is not relied on
    ),
    Setting("port", int, DEFAULT_PORT, "Rendezvous port on master 0.", bounds=(1024, 65535)),
    Setting(
        "masters",
        int | None,
        None,
        "Run on the first M master VMs (default: all); they share the worker(s).",
        decls=("--masters",),
    ),
    Setting(
        "transport_micro",
        bool,
        False,
        "Measure the wire per call instead (MiniLM and BERT-base payloads): master 0's VM "
        "to the host worker and to a VM.",
        decls=("--transport-micro",),
    ),
    Setting("out", Path | None, None, "Folder for results (default: gcvm's state dir)."),
    Setting("role", str, "all", "Run on: all, master or worker VMs."),
    Setting(
        "variables",
        list[str],
        [],
        "KEY=VALUE for the scripts (BATCH, SEQ, REPEAT, WARMUP, MODES, ...).",
        decls=("--set",),
    ),
)
SETTING = {s.name: s for s in SETTINGS}

F = TypeVar("F", bound=Callable[..., Any])


def options_of(*names: str, **changed: Mapping[str, Any]) -> Callable[[F], F]:
    """A verb's typer options, in this order, from the declarations; `changed` gives a verb's
    own default, help or type of a setting (`port={"help": "MASTER_PORT for the ranks."}`).
    The verb takes them as keyword arguments (`def verb(ctx, **options: Any)`), after its own.
    """
    unknown = set(changed) - set(names)
    assert not unknown, f"changed settings the verb does not take: {unknown}"
    params = [replace(SETTING[n], **changed.get(n, {})).parameter() for n in names]

    def declare(verb: F) -> F:
        own = [p for p in inspect.signature(verb).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]  # fmt: skip
        verb.__signature__ = inspect.Signature([*own, *params])  # type: ignore[attr-defined]
        return verb

    return declare


def framework_args(settings: BenchSettings, only: Iterable[str] | None = None,
                   **per_rank: Any) -> list[str]:  # fmt: skip
    """The framework's workload flags for these settings (in the declarations' order); `per_rank`
    the values the orchestrator sets per rank (threads); `only` a subset (by name)."""
    chosen = set(only) if only is not None else None
    args: list[str] = []
    for s in SETTINGS:
        if s.framework is None or (chosen is not None and s.name not in chosen):
            continue
        value = per_rank[s.name] if s.name in per_rank else getattr(settings, s.name, s.default)
        if s.type is bool:
            if value:
                args.append(s.framework)
            elif s.negation is not None:
                args.append(s.negation)
        elif value is not None:
            args += [s.framework, s.render(value)]
    return args


@dataclass(frozen=True)
class BenchSettings:
    """A run's workload, validated before anything starts (defaults: the declarations')."""

    model: str = SETTING["model"].default
    modes: tuple[str, ...] = SETTING["modes"].parse(SETTING["modes"].default)
    batch: int = SETTING["batch"].default
    seq: int = SETTING["seq"].default
    repeat: int = SETTING["repeat"].default
    warmup: int = SETTING["warmup"].default
    seed: int | None = SETTING["seed"].default  # None: every secret from the guest's CSPRNG
    audit: bool = SETTING["audit"].default
    verify: bool = SETTING["verify"].default
    port: int = SETTING["port"].default
    masters: int | None = SETTING["masters"].default  # the first M master VMs (None: all)
    timeout: float = SETTING["timeout"].default  # the whole run, enforced here
    rpc_timeout: float = SETTING["rpc_timeout"].default  # each rank's rendezvous and call deadline
    # model packages: `model` is a built-in name (protected on the host) or DIR[,DIR..]
    keys: tuple[str, ...] = ()  # the given packages' key files (default DIR/model.key)
    owner: str | None = SETTING["owner"].default  # owner folder (default owner_dir)
    policy: str | None = SETTING["policy"].default  # the broker's policy file (snp/tdx)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **given: Any) -> BenchSettings:
        """From a verb's options (as typer gives them): each setting the verb takes, parsed as
        declared; `given` sets the others."""
        taken = {f.name for f in fields(cls)} & set(options)
        return cls(**{n: SETTING[n].parse(options[n]) for n in taken}, **given)

    @property
    def builtin(self) -> bool:
        return self.model in MODELS

    @property
    def package_dirs(self) -> tuple[Path, ...]:
        return () if self.builtin else tuple(Path(p) for p in self.model.split(",") if p)

    def __post_init__(self) -> None:
        # here, not at the top: `gcvm --help` builds the verbs' options from this module
        from orchestrator import packages

        if not self.builtin and not all(
            (d / packages.MANIFEST).is_file() for d in self.package_dirs or (Path(self.model),)
        ):
            missing = next(
                (d for d in self.package_dirs if not (d / packages.MANIFEST).is_file()),
                Path(self.model),
            )
            raise UsageError(
                f"unknown model {str(missing)!r}: neither a built-in model nor a package folder",
                hint=f"choose one of {', '.join(MODELS)}, or a folder from `gcvm model protect`",
            )
        if self.keys and self.builtin:
            raise UsageError(f"--key is for package folders; {self.model} is a built-in model",
                             hint="its keys are made here, in the owner folder")  # fmt: skip
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UsageError(
                f"unknown mode(s) {', '.join(bad) or '(none given)'}",
                hint=f"choose from {', '.join(MODES)}",
            )
        for s in SETTINGS:
            if s.bounds is not None and hasattr(self, s.name):
                lo, hi = s.bounds
                value = getattr(self, s.name)
                if not lo <= value <= hi:
                    raise UsageError(f"{s.flag} {value} is out of range ({lo}..{hi})")
        if self.masters is not None and self.masters < 1:
            raise UsageError(f"--masters {self.masters} is out of range (at least 1)",
                             hint="leave it out to run on every master VM")  # fmt: skip

    def launch_args(self, json_path: str | None, threads: int,
                    model_args: Sequence[str] = ()) -> tuple[str, ...]:  # fmt: skip
        """A rank's workload flags; `model_args` its package flags (--model DIR ... --broker URL
        --tee T for a master, --package DIR ... for a worker)."""
        args = [*model_args, *framework_args(self, threads=threads)]
        if json_path:
            args += ["--json", json_path]
        return tuple(args)
