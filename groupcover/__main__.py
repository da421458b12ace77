"""`python -m groupcover launch|bench|attack|protect|ownerkey|sign|standin|frontier|keyrelease`: the
framework's command line, one verb per entry of `VERBS` (argparse: it runs in guests that hold
only the framework's own dependencies). A run's workload flags are declared once, in
`groupcover.settings`. Expected failures print one line, exit 2 or 3."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupcover import trust
from groupcover.argtypes import int_in, non_negative_int, output_file, output_folder, positive_int
from groupcover.attacks import frontier
from groupcover.bench.local import LocalRun, run_local
from groupcover.bench.micro import run_micro
from groupcover.errors import GroupCoverError, RendezvousError, UsageError, print_error
from groupcover.keyrelease import cli as keyrelease
from groupcover.launch import RankSettings, Role, launch
from groupcover.models import standin
from groupcover.modes import MODES, uses_mask_worker
from groupcover.package.build import (
    DEFAULT_SCHEME,
    PACKAGE_SCHEMES,
    ProtectOptions,
    parse_references,
    protect,
)
from groupcover.package.keys import read_key
from groupcover.package.layout import KEY, SIGNATURE, is_package
from groupcover.package.runtime import open_package
from groupcover.package.signature import generate_owner_key, load_signing_key, sign_package
from groupcover.rendezvous import Rendezvous
from groupcover.settings import DEFAULT_MODEL, MAX_THREADS, add_workload, workload_argv
from groupcover.trust import b64url


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2), like every other."""

    def error(self, message: str) -> NoReturn:
        # "argument --batch: --batch 0 is out of range": the settings' types name their flag
        head, _, said = message.partition(": ")
        if head.startswith("argument ") and said.startswith(head.removeprefix("argument ") + " "):
            message = said
        print_error(UsageError(message, hint=f"see `{self.prog} --help`"))
        sys.exit(2)


def _add_launch(launch_p: argparse.ArgumentParser) -> None:
    add = launch_p.add_argument
    add("--role", choices=[role.value for role in Role], required=True)
    add("--rank", type=non_negative_int("--rank"), help="this process's rank (default: $RANK)")
    add("--world-size", type=int_in("--world-size", 2),
        help="masters + workers (default: $WORLD_SIZE)")  # fmt: skip
    add("--worker", type=int, help="(master) the worker rank to offload to (default: $WORKER)")
    add("--mask-worker", type=int, dest="mask_worker",
        help="(master, the -2w modes) the rank of a second worker, not colluding with the "
        "first, that computes the masks' products (default: $MASK_WORKER)")  # fmt: skip
    add("--master-addr", help="rendezvous address, rank 0's (default: $MASTER_ADDR)")
    add("--master-port", type=int_in("--master-port", 1, 65535),
        help="rendezvous port (default: $MASTER_PORT)")  # fmt: skip
    add("--ifname", help="interface for Gloo and TensorPipe (default: $TP_SOCKET_IFNAME)")
    add("--force-tcp", action="store_true",
        help="(torch-rpc) TensorPipe over TCP only, no shared memory; tcp always is")  # fmt: skip
    add("--package", dest="packages", type=Path, action="append", default=[],
        help="(worker) a model package folder whose published weights this worker loads from "
        "its own copy (repeatable)")  # fmt: skip
    add("--published", dest="packages", type=Path, action="append",
        help="(worker) a published.safetensors file, the same without the folder")  # fmt: skip
    add_workload(launch_p)


def _add_bench(bench_p: argparse.ArgumentParser) -> None:
    kind = bench_p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--local", action="store_true", help="master + worker processes, loopback")
    kind.add_argument("--micro", action="store_true", help="de-obfuscation vs plain linear")
    kind.add_argument("--transport-micro", action="store_true",
                      help="per-call latency and bandwidth of the wire for MiniLM and BERT-base "
                      "layer payloads (loopback, or --target)")  # fmt: skip
    bench_p.add_argument("--target", default=None, type=_address,
                         help="(--transport-micro) ADDR:PORT of a serving micro worker "
                         "(default: one on loopback)")  # fmt: skip
    bench_p.add_argument("--label", default=None, help="(--transport-micro) what the table says")
    bench_p.add_argument(
        "--allow-shm",
        action="store_true",
        help="(--local, torch-rpc) let TensorPipe use shared memory",
    )
    add_workload(bench_p)


def _address(text: str) -> str:
    """--target ADDR:PORT, checked as it is parsed (kept as text: the table names it)."""
    from groupcover.measure.transport_micro import parse_address

    try:
        parse_address(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(f"--target {exc.message}") from None
    return text


# ---- `protect`: a model package (groupcover/package/) -----------------------------------------


def _add_protect(protect_p: argparse.ArgumentParser) -> None:
    add = protect_p.add_argument
    add("src", metavar="SRC",
        help="a Hugging Face BERT checkpoint folder, FILE.py:FUNCTION returning (module, "
        "example input), or a built-in model name")  # fmt: skip
    add("--scheme", default=DEFAULT_SCHEME, choices=list(PACKAGE_SCHEMES),
        help=f"obfuscation scheme (default: {DEFAULT_SCHEME}, gcvm's recommendation)")  # fmt: skip
    add("--out", type=output_folder("--out"), required=True,
        help="the package folder to write (must not exist)")  # fmt: skip
    add("--key-out", type=output_file("--key-out"), default=None,
        help="write the model key here instead of OUT/model.key (mode 0600)")  # fmt: skip
    add("--k", type=positive_int("--k"), default=4, help="group size (groupcover)")
    add("--baselines", action="store_true",
        help="also seal the plaintext offloaded weights, so that tee-only, plain-offload and "
        "mask-only can run from the package (benchmarks only)")  # fmt: skip
    add("--reference", default="8x128,2x16",
        help="BxS[,BxS..]: benchmark input shapes whose plaintext outputs are sealed, so the "
        "master checks exactness without plaintext weights")  # fmt: skip
    add("--seed", type=int, default=None,
        help="secrets reproducible from this seed (tests only: not secret)")  # fmt: skip
    add("--threads", type=int_in("--threads", 1, MAX_THREADS), default=1,
        help="torch threads (default 1: the many small batched factorisations run slower "
        "with more threads on a loaded host)")  # fmt: skip
    add(
        "--sign-key",
        type=Path,
        default=None,
        metavar="OWNER.key",
        help="sign the package with the owner's private key (mode 0600; see `ownerkey`)",
    )


def _protect(args: argparse.Namespace) -> int:
    signer = load_signing_key(args.sign_key) if args.sign_key else None  # before minutes of work
    torch.set_num_threads(args.threads)
    options = ProtectOptions(scheme=args.scheme, k=args.k, baselines=args.baselines,
                             references=parse_references(args.reference), seed=args.seed,
                             key_out=args.key_out, signer=signer)  # fmt: skip
    start = time.perf_counter()
    manifest = protect(args.src, args.out, options)
    seconds = time.perf_counter() - start
    key = args.key_out or args.out / "model.key"
    print(json.dumps({"package": str(args.out), "package_id": manifest["package_id"],
                      "scheme": manifest["scheme"], "modes": manifest["modes"],
                      "layers": len(manifest["layers"]), "key": str(key),
                      "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
                      "signed_by": _signer_facts(signer)}))  # fmt: skip
    if manifest.get("baselines"):
        print(f"groupcover: warning: {manifest['baselines']['warning']}", file=sys.stderr)
    return 0


def _signer_facts(signer: Ed25519PrivateKey | None) -> str | None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if signer is None:
        return None
    return b64url(signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


# ---- `ownerkey` and `sign`: who made a package (groupcover/package/signature.py) --------------


def _add_ownerkey(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for owner.key (private, 0600) and owner.pub; an existing "
                        "key is never overwritten")  # fmt: skip


def _ownerkey(args: argparse.Namespace) -> int:
    private, public, raw = generate_owner_key(args.out)
    print(json.dumps({"private": str(private), "public": str(public), "owner_key": b64url(raw),
                      "kernel_cmdline": trust.cmdline_params(None, raw)}))  # fmt: skip
    print(f"groupcover: keep {private} on this machine; pin {public} in the master "
          "(the kernel_cmdline parameter, or --owner-key where nothing is measured)",
          file=sys.stderr)  # fmt: skip
    return 0


def _add_sign(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, metavar="DIR", help="the package folder to sign")
    parser.add_argument("--sign-key", type=Path, required=True, metavar="OWNER.key",
                        help="the owner's private key (mode 0600)")  # fmt: skip
    parser.add_argument("--key-file", type=Path, default=None,
                        help="the package's model key (default DIR/model.key where it is): the "
                        "manifest is checked against the sealed bundle before signing")  # fmt: skip


def _sign(args: argparse.Namespace) -> int:
    signer = load_signing_key(args.sign_key)
    files = open_package(args.package)  # a package (format, files), not any folder
    key_file = args.key_file or args.package / KEY
    checked = key_file.is_file() or args.key_file is not None
    if checked:  # never vouch for a manifest that disagrees with the bundle (no code runs)
        files.check_sealed(read_key(key_file))
    else:
        print(f"groupcover: warning: no model key at {key_file}: the manifest was not checked "
              "against the sealed bundle (give --key-file)", file=sys.stderr)  # fmt: skip
    document = sign_package(args.package, signer)
    print(json.dumps({"package": str(args.package), "signature": str(args.package / SIGNATURE),
                      "signed_by": document["public_key"], "manifest_checked": checked,
                      "files": document["statement"]["files"]}))  # fmt: skip
    return 0


# ---- `attack`: the security evaluation (groupcover/attacks/) ----------------------------------


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(flag: str, lo: int) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers of at least `lo`, at least one."""
    one = int_in(flag, lo)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(part) for part in _csv(text))
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} names no value")
        return values

    parse.__name__ = "int"
    return parse


def _add_attack(attack_p: argparse.ArgumentParser) -> None:
    add = attack_p.add_argument
    add("--victim", default="minilm-finetuned", choices=["minilm-finetuned"])
    add("--schemes", type=_csv, default=("all",), help="comma-separated scheme names, or all")
    add("--k", type=_ints("--k", 1), default=(4, 8),
        help="group sizes for the schemes that take one")  # fmt: skip
    add("--layers", type=_ints("--layers", 0), default=None,
        help="encoder blocks to attack (default: all)")  # fmt: skip
    add("--attacks", type=_csv, default=None, help="attack names (default: the whole suite)")
    add("--queries", type=positive_int("--queries"), default=200,
        help="victim labels the thief buys")  # fmt: skip
    add("--seeds", type=positive_int("--seeds"), default=3, help="stealing seeds")
    add("--steal", choices=("finetune", "head"), default="finetune",
        help="the thief fine-tunes every layer and a head (default), or a head only")  # fmt: skip
    add("--steal-steps", type=positive_int("--steal-steps"), default=24,
        help="fine-tuning steps of 16 queries")  # fmt: skip
    add("--json", type=output_file("--json"), default=None, help="write the full results here")
    add("--chart", type=output_file("--chart"), default=None,
        help="write a PNG chart here (needs matplotlib)")  # fmt: skip


def _attack(args: argparse.Namespace) -> int:
    # Here, not at the top: the attack harness costs start-up time that no other verb (and no
    # guest, which runs `launch`) should pay.
    from groupcover.attacks import harness, report

    settings = harness.EvalSettings(
        schemes=args.schemes, ks=args.k, layers=args.layers, attacks=args.attacks,
        queries=args.queries, steal_seeds=tuple(range(args.seeds)), steal=args.steal,
        steal_steps=args.steal_steps,
    )  # fmt: skip

    def partial(result: dict) -> None:
        if args.json is not None:
            report.write_json(result, args.json)

    result = harness.evaluate(settings, partial=partial)
    print(report.render(result))
    if args.json is not None:
        report.write_json(result, args.json)
    if args.chart is not None:
        report.chart(result, args.chart)
    return 0


# flag -> the seed's environment variable it falls back to
ENV_FALLBACK = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}


def _rendezvous(args: argparse.Namespace, env: Mapping[str, str]) -> Rendezvous:
    """Explicit flags first; a flag left out is taken from the seed's environment variable."""
    merged = {name: env[var] for name, var in ENV_FALLBACK.items() if env.get(var)}
    merged.update({name: str(getattr(args, name)) for name in ENV_FALLBACK
                   if getattr(args, name) is not None})  # fmt: skip
    missing = [f"--{n.replace('_', '-')} (or ${v})" for n, v in ENV_FALLBACK.items()
               if n not in merged]  # fmt: skip
    if missing:
        raise RendezvousError(f"missing rendezvous setting(s): {', '.join(missing)}")
    ifname = args.ifname or env.get("TP_SOCKET_IFNAME") or env.get("GLOO_SOCKET_IFNAME")
    return Rendezvous.from_env(
        {var: merged[name] for name, var in ENV_FALLBACK.items()},
        ifname=ifname or None,
        force_tcp=args.force_tcp,
        timeout_s=args.timeout,
    )


def _worker_rank(
    args: argparse.Namespace, env: Mapping[str, str], flag: str = "worker", var: str = "WORKER"
) -> int | None:
    """A rank from its flag, else from the seed's environment variable (`WORKER`)."""
    given = getattr(args, flag)
    if given is not None or not env.get(var):
        return cast(int | None, given)
    try:
        return int(env[var])
    except ValueError:
        raise UsageError(f"{var}={env[var]!r} is not an integer") from None


def _models(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.models or (DEFAULT_MODEL,))


def _key_files(args: argparse.Namespace) -> tuple[Path, ...]:
    return tuple(args.key_files or ())


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> RankSettings:
    rendezvous = _rendezvous(args, env)
    return RankSettings(
        role=Role(args.role),
        rank=rendezvous.rank,
        world_size=rendezvous.world_size,
        master_addr=rendezvous.master_addr,
        master_port=rendezvous.master_port,
        worker=_worker_rank(args, env),
        mask_worker=_worker_rank(args, env, "mask_worker", "MASK_WORKER"),
        ifname=rendezvous.ifname,
        model=_models(args)[0],
        extra_models=_models(args)[1:],
        modes=args.modes,
        batch=args.batch,
        seq=args.seq,
        repeat=args.repeat,
        warmup=args.warmup,
        seed=args.seed,
        json_path=args.json,
        force_tcp=args.force_tcp,
        timeout_s=args.timeout,
        audit=args.audit,
        audit_forwards=args.audit_forwards,
        verify=args.verify,
        threads=args.threads,
        transport=args.transport,
        key_file=_key_files(args)[0] if _key_files(args) else None,
        extra_key_files=_key_files(args)[1:],
        broker=args.broker,
        tee=args.tee,
        broker_cert=args.broker_cert,
        owner_key=args.owner_key,
        packages=tuple(args.packages or ()),
        mask_budget_mb=args.mask_budget,
        pool_compare=args.pool_compare,
        request_rate=args.request_rate,
    )


def _bench(args: argparse.Namespace) -> int:
    if args.micro:
        return run_micro(args.batch, args.seq, args.repeat, args.json, args.threads)
    if args.transport_micro:
        from groupcover.measure import transport_micro

        return transport_micro.run(args.batch, args.seq, args.repeat, args.json, args.threads,
                                   args.target, args.label, args.timeout)  # fmt: skip
    # Validate here too, so bad input fails before two processes start.
    two = any(m in MODES and uses_mask_worker(m) for m in args.modes)  # + a mask worker
    probe = RankSettings(
        role=Role.master, rank=0, world_size=3 if two else 2, worker=1,
        mask_worker=2 if two else None, model=_models(args)[0],
        extra_models=_models(args)[1:], modes=args.modes,
        batch=args.batch, seq=args.seq, repeat=args.repeat, warmup=args.warmup,
        threads=args.threads, timeout_s=args.timeout, transport=args.transport,
        key_file=_key_files(args)[0] if _key_files(args) else None,
        extra_key_files=_key_files(args)[1:], broker=args.broker, tee=args.tee,
        broker_cert=args.broker_cert, owner_key=args.owner_key,
        mask_budget_mb=args.mask_budget, pool_compare=args.pool_compare,
    )  # fmt: skip
    probe.validate()
    worker_argv = tuple(a for m in _models(args) if is_package(m) for a in ("--package", m))
    master_argv = workload_argv(args, leave_out=LocalRun.BOTH_RANKS)
    local = LocalRun(master_argv, not args.allow_shm, args.timeout, transport=args.transport,
                     worker_args=worker_argv, workers=2 if two else 1)  # fmt: skip
    return run_local(local)


def _launch(args: argparse.Namespace) -> int:
    return launch(_settings(args, os.environ))


@dataclass(frozen=True)
class Verb:
    """One verb of the command line: its help line, its flags and what runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# Every verb, in the order --help lists them; `main` dispatches through this dict only.
VERBS: dict[str, Verb] = {
    "launch": Verb("run one rank (master or worker)", _add_launch, _launch),
    "bench": Verb("benchmark on this host (--local or --micro)", _add_bench, _bench),
    "attack": Verb("security evaluation: every attack on every scheme", _add_attack, _attack),
    "protect": Verb("protect a model offline into a model package", _add_protect, _protect),
    "ownerkey": Verb("make the owner's package-signing key pair", _add_ownerkey, _ownerkey),
    "sign": Verb("sign a model package with the owner's key", _add_sign, _sign),
    "standin": Verb(standin.DESCRIPTION, standin.add_arguments, standin.run),
    "frontier": Verb(frontier.DESCRIPTION, frontier.add_arguments, frontier.run),
    "keyrelease": Verb(keyrelease.DESCRIPTION, keyrelease.add_arguments, keyrelease.run),
}


def _build_parser() -> Parser:
    parser = Parser(prog="python -m groupcover", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, verb in VERBS.items():
        verb.add_arguments(sub.add_parser(name, help=verb.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return VERBS[args.command].run(args)
    except GroupCoverError as exc:
        print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("groupcover: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
