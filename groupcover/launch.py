"""THE single entry point for one rank: `RankSettings` in, exit code out.

A master runs the benchmark against its target worker and writes JSON; a worker serves until
every master has finished. The VM orchestrator, `python -m groupcover bench --local` and the seed's
console scripts all end up here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from groupcover import rpc, trust
from groupcover.bench import report
from groupcover.bench.run import benchmark
from groupcover.bench.stats import UNBOUNDED, base_mode
from groupcover.errors import GroupCoverError, UsageError, WorkerUnavailable, print_error
from groupcover.models import MODELS
from groupcover.modes import MODES, mode_settings, uses_mask_worker
from groupcover.package.keys import KeySource
from groupcover.package.layout import is_package
from groupcover.package.prepare import ModelRequest, Prepared, prepare
from groupcover.package.runtime import assign_modes, open_package
from groupcover.published import PublishedFile
from groupcover.rendezvous import Rendezvous, rank_name
from groupcover.rpc import RpcTransport
from groupcover.settings import DEFAULT_MODEL, TRANSPORTS, check_ranges, default
from groupcover.transport import TORCH_RPC_WARNING, Transport
from groupcover.twoworkers import open_pair
from groupcover.wire import world
from groupcover.worker import WorkerState


class Role(StrEnum):
    master = "master"
    worker = "worker"


@dataclass(frozen=True)
class RankSettings:
    role: Role
    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    worker: int | None = None  # the rank a master offloads to (the seed's WORKER)
    mask_worker: int | None = None  # (the -2w modes) the rank computing u (MASK_WORKER)
    ifname: str | None = None
    # the workload's defaults are declared once, with their flags (groupcover.settings)
    model: str = DEFAULT_MODEL
    modes: tuple[str, ...] = default("modes")
    batch: int = default("batch")
    seq: int = default("seq")
    repeat: int = default("repeat")
    warmup: int = default("warmup")
    seed: int | None = default("seed")  # None: secrets from the OS; a seed: reproducible runs
    json_path: Path | None = default("json_path")  # noqa: RUF009 (None: immutable)
    force_tcp: bool = False
    timeout_s: float = default("timeout_s")
    audit: bool = default("audit")
    audit_forwards: int = default("audit_forwards")  # untimed forwards the audit watches, first
    verify: bool = default("verify")  # check every worker result (Freivalds, secret vectors)
    threads: int = default("threads")
    init_method: str | None = None  # overrides address and port (file:// on one host)
    transport: str = default("transport")  # "tcp" (tensors only) or "torch-rpc" (the seed's)
    extra: dict[str, str] = field(default_factory=dict)  # recorded in the JSON as given
    # model packages: `model` is a package folder or a built-in name
    key_file: Path | None = None  # (master, package) the model key
    broker: str | None = None  # (master, package) ... or released by this KBS broker
    tee: str | None = None  # the evidence given to the broker: none, snp or tdx
    # (master) pins where the measured boot has none (groupcover.trust: the measured ones win)
    broker_cert: Path | None = default("broker_cert")  # noqa: RUF009 (None: immutable)
    owner_key: Path | None = default("owner_key")  # noqa: RUF009 (None: immutable)
    packages: tuple[Path, ...] = ()  # (worker) package folders or published.safetensors files
    extra_models: tuple[str, ...] = ()  # (master) further package folders, after `model`
    extra_key_files: tuple[Path, ...] = ()  # (master) their key files, after `key_file`
    request_rate: float | None = default("request_rate")  # requests/s (None: no stream)
    mask_budget_mb: float | None = default("mask_budget_mb")  # None: no bound (a pair per layer)
    pool_compare: bool = default(
        "pool_compare"
    )  # also run each masked mode with the unbounded pool

    @property
    def models(self) -> tuple[str, ...]:
        """Every model package of this master (or the one built-in name)."""
        return (self.model, *self.extra_models)

    @property
    def key_files(self) -> tuple[Path, ...]:
        """Their key files, in the same order (empty: the broker releases them)."""
        return () if self.key_file is None else (self.key_file, *self.extra_key_files)

    def model_request(self) -> ModelRequest:
        """What preparing this master's model needs, and nothing else of the settings."""
        return ModelRequest(
            models=self.models,
            modes=self.modes,
            batch=self.batch,
            seq=self.seq,
            seed=self.seed,
            audit=self.audit,
            key_files=self.key_files,
            broker=self.broker,
            tee=self.tee,
            mask_budget_mb=self.mask_budget_mb,
            pins=trust.resolve(self.broker_cert, self.owner_key),
        )

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(
            rank=self.rank,
            world_size=self.world_size,
            master_addr=self.master_addr,
            master_port=self.master_port,
            ifname=self.ifname,
            force_tcp=self.force_tcp,
            timeout_s=self.timeout_s,
            init_method=self.init_method,
        )

    def validate(self) -> None:
        """Everything that can be checked before joining the world (so a bad rank exits early)."""
        self.rendezvous()  # rank, world size, port, timeout
        if self.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {self.threads}")
        if self.transport not in TRANSPORTS:
            raise UsageError(
                f"unknown transport {self.transport!r}", hint=f"choose {' or '.join(TRANSPORTS)}"
            )
        if self.role is Role.worker:
            self._validate_packages()
            return
        self._validate_target()
        check_ranges(self)  # --batch, --seq, --repeat, --warmup, --audit-forwards
        _validate_names(self.model, self.modes)
        self._validate_key()

    def _validate_packages(self) -> None:
        for path in self.packages:
            if not (path.is_dir() and (path / "published.safetensors").is_file()) and not (
                path.is_file()
            ):
                raise UsageError(f"--package {path}: no published.safetensors there",
                                 hint="give a package folder or its weights file")  # fmt: skip

    def _validate_key(self) -> None:
        source = KeySource(self.key_file, self.broker, self.tee)
        source.validate()
        trust.resolve(self.broker_cert, self.owner_key)  # a pin the host may not give: now
        if self.mask_budget_mb is not None and self.mask_budget_mb < 0:
            raise UsageError(f"--mask-budget {self.mask_budget_mb} is negative")
        if not is_package(self.model):
            if self.extra_models:
                raise UsageError(f"--model {self.model} is a built-in model: it cannot be given "
                                 "with other --model", hint="give package folders only, or "
                                 "one built-in name")  # fmt: skip
            if source.given:
                raise UsageError(f"--model {self.model} is a built-in model, not a package: it "
                                 "needs no key", hint="drop --key-file/--broker")  # fmt: skip
            return
        if self.extra_key_files and self.key_file is None:
            raise UsageError("--key-file given for some packages only")
        not_packages = [m for m in self.models if not is_package(m)]
        if not_packages:
            raise UsageError(f"--model {not_packages[0]} is not a model package folder",
                             hint="several --model must all be package folders (protect them "
                             "with `python -m groupcover protect`)")  # fmt: skip
        if self.key_files and len(self.key_files) != len(self.models):
            raise UsageError(
                f"{len(self.models)} packages but {len(self.key_files)} --key-file",
                hint="give one --key-file per --model, in the same order (or --broker)",
            )
        assign_modes([open_package(m) for m in self.models], self.modes)
        if not source.given:
            raise UsageError(
                f"package {self.model} needs its model key",
                hint="pass --key-file FILE, or --broker URL --tee none|snp|tdx",
            )

    def _validate_target(self) -> None:
        if self.worker is None:
            raise UsageError(
                "a master needs a worker rank to offload to",
                hint="pass --worker K (or set WORKER=K), K being a worker's rank",
            )
        if self.worker == self.rank:
            raise UsageError(
                f"worker rank {self.worker} is this master's own rank",
                hint="WORKER/--worker names the rank of a worker process, not the master's",
            )
        if not 0 <= self.worker < self.world_size:
            raise UsageError(
                f"worker rank {self.worker} is outside the world (ranks 0..{self.world_size - 1})"
            )
        self._validate_mask_worker()

    def needs_mask_worker(self) -> bool:
        return any(mode in MODES and uses_mask_worker(mode) for mode in self.modes)

    def _validate_mask_worker(self) -> None:
        """The -2w modes need a second worker rank, other than the worker and the master."""
        if self.mask_worker is None:
            if self.needs_mask_worker():
                raise UsageError(
                    "the -2w modes need a second worker, for the masks' products",
                    hint="pass --mask-worker K (or set MASK_WORKER=K), K being the rank of a "
                    "worker that does not collude with --worker's",
                )
            return
        if self.mask_worker in (self.rank, self.worker):
            raise UsageError(
                f"mask worker rank {self.mask_worker} is this master's or its worker's rank",
                hint="the -2w modes need two distinct workers that do not collude",
            )
        if not 0 <= self.mask_worker < self.world_size:
            raise UsageError(f"mask worker rank {self.mask_worker} is outside the world "
                             f"(ranks 0..{self.world_size - 1})")  # fmt: skip


def _validate_names(model: str, modes: tuple[str, ...]) -> None:
    if model not in MODELS and not is_package(model):
        raise UsageError(
            f"unknown model {model!r}",
            hint=f"give a model package folder (python -m groupcover protect) or one of "
            f"{', '.join(MODELS)}",
        )
    if not modes:
        raise UsageError("no mode given", hint=f"choose from {', '.join(MODES)}")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise UsageError(
            f"unknown mode(s) {', '.join(unknown)}", hint=f"choose from {', '.join(MODES)}"
        )
    if len(set(modes)) != len(modes):
        raise UsageError(f"a mode is repeated in {','.join(modes)}")


def progress(settings: RankSettings, message: str) -> None:
    """One line per step on stderr, prefixed like errors; stdout stays the results' own."""
    print(f"groupcover: rank {settings.rank} ({settings.role}): {message}", file=sys.stderr,
          flush=True)  # fmt: skip


def launch(settings: RankSettings) -> int:
    """Runs one rank to completion; expected failures become one line on stderr and an exit code."""
    try:
        settings.validate()
        torch.set_num_threads(settings.threads)
        if settings.role is Role.worker:
            progress(settings, f"joining a world of {settings.world_size} to serve "
                     f"({settings.transport})")  # fmt: skip
            if settings.transport == "torch-rpc":
                rpc.serve(settings.rendezvous())
            else:
                state = worker_state(settings)
                world.serve(settings.rendezvous(), state=state,
                            on_ready=lambda text: progress(settings, text))  # fmt: skip
            progress(settings, "every rank has finished")
            return 0
        rpc_master = _run_master_rpc if settings.transport == "torch-rpc" else _run_master_wire
        return _run_master(settings, rpc_master)
    except GroupCoverError as exc:
        print_error(exc)
        return exc.exit_code


def worker_state(settings: RankSettings) -> WorkerState:
    """The worker's layer store, with the published weights of every package it was given."""
    state = WorkerState()
    for path in settings.packages:
        file = path / "published.safetensors" if path.is_dir() else path
        published = PublishedFile(file)
        state.add_published(published)
        progress(settings, f"holds package {published.package_id[:12]} "
                 f"({len(published.entries)} published layers, {file})")  # fmt: skip
    return state


def _run_master(settings: RankSettings, run: Callable[[RankSettings, Prepared], int]) -> int:
    """Prepare the model, then run the master over the chosen transport (`run`)."""
    prepared = prepare(
        settings.model_request()
    )  # load the model before joining: a bad model exits early
    try:
        return run(settings, prepared)
    finally:
        prepared.close()


def _announce(settings: RankSettings, prepared: Prepared) -> None:
    what = "package" if prepared.packages and not prepared.cleanup else "model"
    label = f"; {prepared.key_release['label']}" if prepared.key_release else ""
    progress(settings, f"{what} {settings.model} ready in {prepared.load_s:.1f} s{label}; "
             f"joining a world of {settings.world_size}")  # fmt: skip


def _run_master_rpc(settings: RankSettings, prepared: Prepared) -> int:
    _announce(settings, prepared)
    rpc.join(settings.rendezvous(), "master")
    graceful = True
    try:
        assert settings.worker is not None
        device = _check_target(settings.worker, settings.timeout_s)
        progress(settings, f"offloading to {rank_name(settings.worker)} ({device})")
        if settings.needs_mask_worker():
            assert settings.mask_worker is not None
            _check_target(settings.mask_worker, settings.timeout_s)
        document = run_master(settings, prepared, lambda text: progress(settings, text))
        _report(settings, document)
        return 0
    except WorkerUnavailable:
        graceful = False  # a dead peer cannot join the shutdown barrier
        raise
    finally:
        if graceful:
            rpc.finish(settings.rendezvous())  # wait for the other ranks, watching they live
        else:
            rpc.leave(graceful=False)


def _run_master_wire(settings: RankSettings, prepared: Prepared) -> int:
    """A master over the default wire: tensors only, every reply checked."""
    _announce(settings, prepared)
    membership = world.join(settings.rendezvous(), "master")
    ok = False
    try:
        assert settings.worker is not None
        target = settings.worker
        role = membership.role_of(target)
        if role != "worker":
            raise UsageError(
                f"rank {target} is a {role}, not a worker",
                hint="WORKER/--worker must name a rank started with --role worker",
            )
        probe = membership.connect(target, f"{settings.rank}/hello", settings.timeout_s)
        probe.close()
        progress(settings, f"offloading to {probe.label} ({probe.device})")
        masker = settings.mask_worker if settings.needs_mask_worker() else None
        if masker is not None:
            if membership.role_of(masker) != "worker":
                raise UsageError(f"mask worker rank {masker} is a {membership.role_of(masker)}, "
                                 "not a worker")  # fmt: skip
            probe = membership.connect(masker, f"{settings.rank}/hello", settings.timeout_s)
            probe.close()
            progress(settings, f"masks' products (-2w modes) from {probe.label} ({probe.device})")

        def make_transport(mode: str) -> Transport:
            def session(rank: int) -> Callable[[], Transport]:
                return lambda: membership.connect(rank, f"{settings.rank}/{mode}",
                                                  settings.timeout_s)  # fmt: skip

            if masker is not None and uses_mask_worker(mode):
                return open_pair(session(target), session(masker))
            return session(target)()

        document = run_master(
            settings, prepared, lambda text: progress(settings, text), make_transport
        )
        _report(settings, document)
        ok = True
        return 0
    finally:
        if ok:
            membership.finish(ok=True)  # rank 0 keeps the store until every rank is done
        else:
            with contextlib.suppress(GroupCoverError):  # the first failure is the one to report
                membership.finish(ok=False)


def run_master(
    settings: RankSettings,
    prepared: Prepared,
    on_progress: Callable[[str], None] | None = None,
    make_transport: Callable[[str], Transport] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark of this master's modes on the prepared model; returns the document
    (results, host, settings) that `_report` writes. `make_transport(mode)` opens one session per
    mode (default: torch-rpc, already joined)."""
    assert settings.worker is not None
    worker = settings.worker

    if make_transport is None:

        def make_transport(mode: str) -> Transport:
            def session(rank: int) -> Callable[[], Transport]:
                return lambda: RpcTransport(rank, owner=f"{settings.rank}/{mode}",
                                            timeout_s=settings.timeout_s)  # fmt: skip

            if settings.mask_worker is not None and uses_mask_worker(mode):
                return open_pair(session(worker), session(settings.mask_worker))
            return session(worker)()

    transport_facts: dict[str, Any] = {"transport": settings.transport}
    if settings.transport == "torch-rpc":
        transport_facts["transport_warning"] = TORCH_RPC_WARNING

    modes = list(settings.modes)
    if settings.pool_compare:
        modes += [m + UNBOUNDED for m in settings.modes if mode_settings(m)[1]]
    results = benchmark(
        prepared,
        modes,
        make_transport,
        model_name=prepared.model_name or str(settings.model),
        batch=settings.batch,
        seq=settings.seq,
        repeat=settings.repeat,
        warmup=settings.warmup,
        seed=settings.seed,
        audit=settings.audit,
        on_progress=on_progress,
        audit_forwards=settings.audit_forwards,
        verify=settings.verify,
        request_rate=settings.request_rate,
    )
    for result in results:
        result.update(rank=settings.rank, worker=worker, world_size=settings.world_size,
                      **transport_facts)  # fmt: skip
        if uses_mask_worker(base_mode(result["mode"])):
            result["mask_worker"] = settings.mask_worker
    return {
        "results": results,
        "host": report.host_info(),
        "settings": {
            "rank": settings.rank,
            "world_size": settings.world_size,
            "worker": worker,
            "mask_worker": settings.mask_worker,
            **transport_facts,
            "force_tcp": settings.force_tcp,
            "threads": settings.threads,
            "warmup": settings.warmup,
            "seed": settings.seed,
            "secrets": report.secrets_label(settings.seed),
            "verify": settings.verify,
            "results_checked": settings.verify,  # per result: results_checked, integrity_check
            "audit_forwards": settings.audit_forwards if settings.audit else 0,
            "request_rate": settings.request_rate,
            "model_load_s": prepared.load_s,
            "model": settings.model,
            "package": report.package_facts(prepared),
            "key_release": prepared.key_release,
            "mask_budget_bytes": prepared.mask_budget,
            "exactness": prepared.reference_note or "against the sealed reference",
            "peak_rss_mb": results[0].get("peak_rss_mb") if results else None,
            **settings.extra,
        },
    }


def write_json(document: dict[str, Any], settings: RankSettings) -> Path:
    """The document as JSON at --json, by default ./groupcover-<model>-rank<rank>.json."""
    return report.write_json(document, settings.json_path, settings.model, settings.rank)


def _report(settings: RankSettings, document: dict[str, Any]) -> None:
    """The JSON file, the table, and the line naming the file (what the orchestrator reads)."""
    path = write_json(document, settings)
    report.print_table(document)
    print(f"{report.RESULT_MARK} {path}", flush=True)


def _check_target(worker_rank: int, timeout_s: float) -> str:
    """Refuses a target that is not a worker; returns the worker's compute device."""
    answer = rpc.hello(worker_rank, timeout_s)
    if answer.get("role") != "worker":
        raise UsageError(
            f"rank {worker_rank} is a {answer.get('role', 'non-worker')}, not a worker",
            hint="WORKER/--worker must name a rank started with --role worker",
        )
    return answer.get("device", "unknown")
