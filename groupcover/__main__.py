"""`python -m groupcover launch|bench`: the framework's command line (argparse: it runs in guests
that hold only the framework's own dependencies). Expected failures print one line, exit 2 or 3."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn, cast

from groupcover.errors import GroupCoverError, RendezvousError, UsageError, print_error
from groupcover.launch import (
    DEFAULT_MODES,
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    RankSettings,
    Role,
    launch,
)
from groupcover.rpc import DEFAULT_TIMEOUT_S, Rendezvous


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2), like every other."""

    def error(self, message: str) -> NoReturn:
        print_error(UsageError(message, hint=f"see `{self.prog} --help`"))
        sys.exit(2)


def _modes(text: str) -> tuple[str, ...]:
    return tuple(mode.strip() for mode in text.split(",") if mode.strip())


def _add_workload(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="minilm", help="minilm, bert-base, seed-transformer or resnet18")
    add("--modes", type=_modes, default=DEFAULT_MODES, help="comma-separated modes to run")
    add("--batch", type=int, default=8, help="samples per forward")
    add("--seq", type=int, default=128, help="sequence length (token models)")
    add("--repeat", type=int, default=5, help="timed forwards per mode (interleaved)")
    add("--warmup", type=int, default=1, help="untimed forwards per mode first")
    add("--seed", type=int, default=None,
        help="secrets reproducible from this seed (benchmarks only: not secret); "
        "default: secrets from the OS")  # fmt: skip
    add("--threads", type=int, default=1, help="torch intra-op threads in each process")
    add("--json", type=Path, default=None, help="where the master writes its results")
    add("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="RPC and rendezvous timeout (s)")
    add("--audit", action="store_true", help="check every payload the worker sees (untimed)")
    add("--audit-forwards", type=int, default=1,
        help="untimed forwards per mode the audit watches, before the timed ones")  # fmt: skip
    add(
        "--verify",
        action="store_true",
        help="check every worker result with a secret random vector per layer (Freivalds)",
    )
    add("--transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT,
        help="tcp: tensors only, every reply checked (default); torch-rpc: the seed's "
        "torch.distributed.rpc, which lets the worker execute code in the master")  # fmt: skip


def _build_parser() -> Parser:
    parser = Parser(prog="python -m groupcover", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    launch_p = sub.add_parser("launch", help="run one rank (master or worker)")
    add = launch_p.add_argument
    add("--role", choices=[role.value for role in Role], required=True)
    add("--rank", type=int, help="this process's rank (default: $RANK)")
    add("--world-size", type=int, help="masters + workers (default: $WORLD_SIZE)")
    add("--worker", type=int, help="(master) the worker rank to offload to (default: $WORKER)")
    add("--master-addr", help="rendezvous address, rank 0's (default: $MASTER_ADDR)")
    add("--master-port", type=int, help="rendezvous port (default: $MASTER_PORT)")
    add("--ifname", help="interface for Gloo and TensorPipe (default: $TP_SOCKET_IFNAME)")
    add("--force-tcp", action="store_true",
        help="(torch-rpc) TensorPipe over TCP only, no shared memory; tcp always is")  # fmt: skip
    _add_workload(launch_p)

    bench_p = sub.add_parser("bench", help="benchmark on this host (--local or --micro)")
    kind = bench_p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--local", action="store_true", help="master + worker processes, loopback")
    kind.add_argument("--micro", action="store_true", help="de-obfuscation vs plain linear")
    kind.add_argument("--transport-micro", action="store_true",
                      help="per-call latency and bandwidth of the wire for MiniLM and BERT-base "
                      "layer payloads (loopback, or --target)")  # fmt: skip
    bench_p.add_argument("--target", default=None,
                         help="(--transport-micro) ADDR:PORT of a serving micro worker "
                         "(default: one on loopback)")  # fmt: skip
    bench_p.add_argument("--label", default=None, help="(--transport-micro) what the table says")
    bench_p.add_argument(
        "--allow-shm",
        action="store_true",
        help="(--local, torch-rpc) let TensorPipe use shared memory",
    )
    _add_workload(bench_p)
    _add_attack(sub)
    return parser


# ---- `attack`: the security evaluation (issue 9; groupcover/attacks/) --------------------------


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_attack(sub: argparse._SubParsersAction) -> None:
    attack_p = sub.add_parser("attack", help="security evaluation: every attack on every scheme")
    add = attack_p.add_argument
    add("--victim", default="minilm-finetuned", choices=["minilm-finetuned"])
    add("--schemes", type=_csv, default=("all",), help="comma-separated scheme names, or all")
    add("--k", type=lambda t: tuple(int(k) for k in _csv(t)), default=(4, 8),
        help="group sizes for the schemes that take one")  # fmt: skip
    add("--layers", type=lambda t: tuple(int(k) for k in _csv(t)), default=None,
        help="encoder blocks to attack (default: all)")  # fmt: skip
    add("--attacks", type=_csv, default=None, help="attack names (default: the whole suite)")
    add("--queries", type=int, default=200, help="victim labels the thief buys")
    add("--seeds", type=int, default=3, help="stealing seeds")
    add("--json", type=Path, default=None, help="write the full results here")
    add("--chart", type=Path, default=None, help="write a PNG chart here (needs matplotlib)")


def _attack(args: argparse.Namespace) -> int:
    from groupcover.attacks import harness, report

    settings = harness.EvalSettings(
        schemes=args.schemes, ks=args.k, layers=args.layers, attacks=args.attacks,
        queries=args.queries, steal_seeds=tuple(range(args.seeds)),
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


def _worker_rank(args: argparse.Namespace, env: Mapping[str, str]) -> int | None:
    if args.worker is not None or not env.get("WORKER"):
        return cast(int | None, args.worker)
    try:
        return int(env["WORKER"])
    except ValueError:
        raise UsageError(f"WORKER={env['WORKER']!r} is not an integer") from None


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> RankSettings:
    rendezvous = _rendezvous(args, env)
    return RankSettings(
        role=Role(args.role),
        rank=rendezvous.rank,
        world_size=rendezvous.world_size,
        master_addr=rendezvous.master_addr,
        master_port=rendezvous.master_port,
        worker=_worker_rank(args, env),
        ifname=rendezvous.ifname,
        model=args.model,
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
    )


def _workload_argv(args: argparse.Namespace) -> tuple[str, ...]:
    argv = ["--model", args.model, "--modes", ",".join(args.modes), "--batch", str(args.batch),
            "--seq", str(args.seq), "--repeat", str(args.repeat), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]  # fmt: skip
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.json is not None:
        argv += ["--json", str(args.json)]
    if args.audit:
        argv += ["--audit", "--audit-forwards", str(args.audit_forwards)]
    if args.verify:
        argv.append("--verify")
    return tuple(argv)


def _bench(args: argparse.Namespace) -> int:
    from groupcover import bench

    if args.micro:
        return bench.run_micro(args.batch, args.seq, args.repeat, args.json, args.threads)
    if args.transport_micro:
        from groupcover import transport_micro

        return transport_micro.run(args.batch, args.seq, args.repeat, args.json, args.threads,
                                   args.target, args.label, args.timeout)  # fmt: skip
    # Validate here too, so bad input fails before two processes start.
    probe = RankSettings(
        role=Role.master, rank=0, world_size=2, worker=1, model=args.model, modes=args.modes,
        batch=args.batch, seq=args.seq, repeat=args.repeat, warmup=args.warmup,
        threads=args.threads, timeout_s=args.timeout, transport=args.transport,
    )  # fmt: skip
    probe.validate()
    local = bench.LocalRun(_workload_argv(args), not args.allow_shm, args.timeout,
                           transport=args.transport)  # fmt: skip
    return bench.run_local(local)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "launch":
            return launch(_settings(args, os.environ))
        if args.command == "attack":
            return _attack(args)
        return _bench(args)
    except GroupCoverError as exc:
        print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("groupcover: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
