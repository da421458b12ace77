"""The benchmark a master runs: every mode on the same inputs, interleaved, checked against the
plaintext model, timed per forward, written as JSON and shown as a table.

Also the two local front ends: `bench --local` (master and worker as separate processes on
loopback) and `bench --micro` (de-obfuscation against a plain linear layer, in one process).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from groupcover import texttable
from groupcover.errors import GroupCoverError, UsageError
from groupcover.transport import Transport

if TYPE_CHECKING:
    from groupcover.launch import RankSettings

RESULT_MARK = "GROUPCOVER_RESULT_JSON"
BASELINE_MODE = "plain-offload"
MODEL_SEED = 0  # the synthetic models' random weights: fixed, independent of the secrets' seed


UNBOUNDED = " (unbounded pool)"  # a --pool-compare run: the same mode with today's mask pool
MiB = 1 << 20


@dataclass
class Prepared:
    """What the master runs: the model as packages (or, for library callers, a plaintext model),
    its inputs and the sealed reference output (None: exactness not checked)."""

    model: nn.Module | None
    inputs: tuple[torch.Tensor, ...]
    reference: torch.Tensor | None
    load_s: float
    packages: dict[str, Any] = field(default_factory=dict)  # mode -> UnsealedPackage
    key_release: dict[str, Any] | None = None
    reference_note: str | None = None  # why exactness is not checked
    mask_budget: int | None = None  # bytes per masked mode's pool (packages)
    cleanup: list[Path] = field(default_factory=list)  # temporary packages (built-in names)
    protect_s: float = 0.0  # built-in names: protecting on the fly
    model_name: str | None = None  # what results call the model (a package: its manifest's name)

    def close(self) -> None:
        import shutil

        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup.clear()


@dataclass
class ModeRun:
    """One mode's protected model and its transport, plus what its forwards measured."""

    mode: str
    module: nn.Module
    transport: Transport
    setup_s: float
    latencies_s: list[float] = field(default_factory=list)
    breakdowns: list[dict[str, float]] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    bytes_moved: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # the master process's CPU time, beside
    topup_s: list[float] = field(default_factory=list)  # mask generation for the next forward
    integrity_s: list[float] = field(default_factory=list)  # result checks inside each forward
    output: torch.Tensor | None = None

    def clear(self) -> None:
        for series in (self.latencies_s, self.breakdowns, self.calls, self.bytes_moved,
                       self.cpu_s, self.topup_s, self.integrity_s):  # fmt: skip
            series.clear()


def as_tensor(output: Any) -> torch.Tensor:
    """A model's main output tensor (the first one of a tuple, list or mapping)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return as_tensor(next(iter(output.values())))
    if isinstance(output, list | tuple) and output:
        return as_tensor(output[0])
    raise TypeError(f"cannot take a tensor from a model output of type {type(output).__name__}")


def real_batch_of(prepared: Prepared) -> int:
    """The batch the model really ran: the leading dimension of its inputs and its output."""
    if prepared.reference is not None:
        return int(prepared.reference.shape[0])
    return int(prepared.inputs[0].shape[0])


def base_mode(label: str) -> str:
    return label.removesuffix(UNBOUNDED)


def prepare(settings: RankSettings) -> Prepared:
    """The master's model as packages: a package folder opened with the released key, or a
    built-in model name protected on the fly into temporary packages (one per scheme the modes
    need, with baselines: the built-in models are public), removed when the run ends."""
    from groupcover.package.runtime import is_package

    start = time.perf_counter()
    if is_package(settings.model):
        prepared = _prepare_package(settings)
    else:
        prepared = _prepare_builtin(settings)
    prepared.load_s = time.perf_counter() - start
    masked = [m for m in settings.modes if _masked(m)]  # each gets its share of the budget
    if settings.mask_budget_mb is not None and masked:
        prepared.mask_budget = int(settings.mask_budget_mb * MiB / len(masked))
    return prepared


def _masked(mode: str) -> bool:
    from groupcover.modes import mode_settings

    return mode_settings(base_mode(mode))[1]


def _prepare_package(settings: RankSettings) -> Prepared:
    from groupcover.package.keys import DEFAULT_RESOURCE, KeySource, obtain_key
    from groupcover.package.runtime import assign_modes, key_resource, open_package

    files = [open_package(path) for path in settings.models]
    chosen = assign_modes(files, settings.modes)
    used = sorted(set(chosen.values()))
    keys = settings.key_files
    unsealed: dict[int, Any] = {}
    facts: list[dict[str, Any]] = []
    for index in used:  # a package no mode needs is neither released nor opened
        # one package: the broker's gcvm/model/key (as before); several: gcvm/<package_id>/key
        resource = (DEFAULT_RESOURCE if len(files) == 1
                    else key_resource(files[index].manifest["package_id"]))  # fmt: skip
        source = KeySource(keys[index] if keys else None, settings.broker, settings.tee,
                           resource)  # fmt: skip
        release = obtain_key(source)
        unsealed[index] = files[index].unseal(release.key)
        facts.append({**release.facts, "package": str(files[index].root)})
    merged = dict(facts[0])
    if len(facts) > 1:
        merged["seconds"] = round(sum(float(f.get("seconds") or 0.0) for f in facts), 4)
        merged["per_package"] = facts
    packages = {mode: unsealed[chosen[mode]] for mode in settings.modes}
    return _from_packages(settings, packages, merged)


def _from_packages(settings: RankSettings, packages: dict[str, Any],
                   key_release: dict[str, Any] | None) -> Prepared:  # fmt: skip
    from groupcover.package.runtime import is_package, open_package

    first = next(iter(packages.values()))
    inputs = tuple(first.inputs(settings.batch, settings.seq))
    reference = first.reference(settings.batch, settings.seq)
    note = None
    if reference is None:
        note = (f"exactness not checked: no sealed reference for "
                f"{first.reference_label(settings.batch, settings.seq)}")  # fmt: skip
    prepared = Prepared(None, inputs, reference, 0.0, packages, key_release, note)
    if is_package(settings.model):  # a folder: name the model, not where it was copied
        name = (open_package(settings.model).manifest.get("model") or {}).get("name")
        prepared.model_name = str(name) if name else None
    return prepared


def _prepare_builtin(settings: RankSettings) -> Prepared:
    import tempfile

    from groupcover.modes import mode_settings
    from groupcover.package.build import ProtectOptions, protect_source
    from groupcover.package.keys import in_memory
    from groupcover.package.runtime import open_package, read_key
    from groupcover.package.source import load_source

    source = load_source(settings.model)
    schemes: set[str] = set()
    for mode in settings.modes:
        named = mode_settings(mode)[0]
        if named is not None and named != "identity":
            schemes.add(named)
    if not schemes:
        schemes = {"groupcover"}  # baselines only: any scheme's package holds them
    start = time.perf_counter()
    by_scheme: dict[str, Any] = {}
    cleanup: list[Path] = []
    key = b""
    try:
        for scheme in sorted(schemes):
            folder = Path(tempfile.mkdtemp(prefix=f"gcvm-{settings.model}-{scheme}-"))
            cleanup.append(folder)
            options = ProtectOptions(scheme=scheme, baselines=True, seed=settings.seed,
                                     references=((settings.batch, settings.seq),),
                                     publish_audit=settings.audit)  # fmt: skip
            try:
                protect_source(source, folder / "package", options)
            except UsageError as exc:
                if "cannot run the reference input" in exc.message:
                    raise UsageError(
                        f"{settings.model} cannot run batch {settings.batch} x seq "
                        f"{settings.seq}: {exc.message.split(': ', 1)[-1]}",
                        hint="choose a batch and sequence length (image side for resnet18) the "
                        "model accepts",
                    ) from None
                raise
            key = read_key(folder / "package" / "model.key")
            by_scheme[scheme] = open_package(folder / "package").unseal(key)
    except BaseException:
        for path in cleanup:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        raise
    del source
    packages = {}
    for mode in settings.modes:
        wanted = mode_settings(mode)[0] or ""
        packages[mode] = by_scheme.get(wanted, next(iter(by_scheme.values())))
    prepared = _from_packages(settings, packages, in_memory(key).facts)
    prepared.cleanup = cleanup
    prepared.protect_s = time.perf_counter() - start
    return prepared


def prepare_plaintext(settings: RankSettings) -> Prepared:
    """A plaintext model in this process (library callers and tests): protected per mode by
    `groupcover.modes.build_for_mode`, exactness checked against the plaintext output."""
    from groupcover.models import load_model

    start = time.perf_counter()
    # Model weights (random ones for the synthetic models) do not depend on the secrets' seed.
    model, example_input_fn = load_model(settings.model, MODEL_SEED)
    model.eval()
    inputs = tuple(example_input_fn(settings.batch, settings.seq))
    try:
        with torch.no_grad():
            reference = as_tensor(model(*inputs)).detach().clone()
    except (RuntimeError, IndexError, ValueError) as exc:
        raise UsageError(
            f"{settings.model} cannot run batch {settings.batch} x seq {settings.seq}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            hint="choose a batch and sequence length (image side for resnet18) the model accepts",
        ) from None
    return Prepared(model, inputs, reference, time.perf_counter() - start)


def build_mode(
    prepared: Prepared,
    mode: str,
    transport: Transport,
    seed: int | None,
    audit: bool,
    verify: bool = False,
) -> ModeRun:
    """Builds the model for one mode: from its package (no obfuscation: the secrets are sealed,
    the published weights go by reference) or, for a plaintext model, obfuscated here; then one
    mask pair per layer for the first forward (offline; with later top-ups, reported as
    `mask_offline_s`)."""
    from groupcover.modes import build_for_mode

    start = time.perf_counter()
    package = prepared.packages.get(mode) or prepared.packages.get(base_mode(mode))
    if package is not None:
        budget = None if mode.endswith(UNBOUNDED) else prepared.mask_budget
        module = package.build(
            base_mode(mode), transport, seed=seed, mask_pool=1, mask_budget=budget,
            audit=audit, verify=verify, example=prepared.inputs,
        )  # fmt: skip
        module.eval()
        return ModeRun(mode, module, transport, time.perf_counter() - start)
    assert prepared.model is not None
    module = build_for_mode(
        prepared.model,
        mode,
        transport,
        seed,
        audit=audit,
        example_inputs=prepared.inputs,
        mask_pool=1,
        verify=verify,
    )
    module.eval()
    return ModeRun(mode, module, transport, time.perf_counter() - start)


def forward_once(run: ModeRun, inputs: tuple[torch.Tensor, ...], *, timed: bool = True) -> None:
    """One forward; a timed one records its latency, breakdown and CPU time, then the mask
    pool is topped up for the next forward (timed apart: it counts in sustained throughput)."""
    timings = run.transport.timings
    timings.reset()
    checked = _integrity_seconds(run.module)
    cpu = time.process_time()
    start = time.perf_counter()
    with torch.no_grad():
        output = run.module(*inputs)
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu
    run.output = as_tensor(output)
    if timed:
        run.latencies_s.append(total)
        run.cpu_s.append(cpu)
        run.breakdowns.append(timings.breakdown_ms(total))
        run.calls.append(timings.calls)
        run.bytes_moved.append(timings.bytes_sent + timings.bytes_received)
        if checked is not None:
            run.integrity_s.append((_integrity_seconds(run.module) or 0.0) - checked)
    start = time.perf_counter()
    topped = top_up_masks(run.module, inputs)
    if timed and topped:
        run.topup_s.append(time.perf_counter() - start)


def _integrity_seconds(module: nn.Module) -> float | None:
    """The integrity checks' seconds so far (a counter read outside the timed region)."""
    read = getattr(module, "integrity_stats", None)
    stats = read() if read is not None else None
    return None if stats is None else float(stats["seconds"])


def top_up_masks(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Offline, between timed forwards: one fresh mask pair per layer for the next forward.

    Keeping one pair ahead (instead of a pool for the whole run) bounds the master's memory: a
    pair for MiniLM at batch 8 x 128 is about 160 MB, and a guest may have 2 GB.
    """
    top_up = getattr(module, "top_up_masks", None)
    if top_up is not None and top_up(1):
        return True
    fill = getattr(module, "fill_masks", None)
    if fill is not None and getattr(module, "masks", None) is not None:
        fill(*inputs, pairs=1)
        return True
    return False


def set_audit(run: ModeRun, enabled: bool) -> None:
    audit = getattr(run.module, "audit", None)
    if audit is not None:
        audit.enabled = enabled


def run_interleaved(
    runs: Sequence[ModeRun],
    inputs: tuple[torch.Tensor, ...],
    repeat: int,
    warmup: int,
    audit_forwards: int = 1,
) -> None:
    """Audited forwards first (untimed: the audit never runs inside a timed forward), then warm
    each mode up, then one forward per mode per repetition (round robin), the audit off."""
    for run in runs:
        if getattr(run.module, "audit", None) is not None:
            set_audit(run, True)
            for _ in range(max(audit_forwards, 1)):
                forward_once(run, inputs, timed=False)
        set_audit(run, False)
        for _ in range(warmup):
            forward_once(run, inputs, timed=False)
        run.clear()
    for _ in range(repeat):
        for run in runs:
            forward_once(run, inputs)


def paired_ratios(run: ModeRun, base: ModeRun) -> list[float]:
    """Latency ratios of forwards of the same round: slow drifts of a shared host cancel."""
    return [a / b for a, b in zip(run.latencies_s, base.latencies_s, strict=False) if b > 0]


def ratio_summary(ratios: Sequence[float]) -> dict[str, float] | None:
    if not ratios:
        return None
    return {
        "median": statistics.median(ratios),
        "p25": _quantile(ratios, 0.25),
        "p75": _quantile(ratios, 0.75),
        "pairs": len(ratios),
    }


def median_breakdown(run: ModeRun) -> dict[str, float]:
    """The parts of the median forward(s): they add up to the median latency itself."""
    order = sorted(range(len(run.latencies_s)), key=run.latencies_s.__getitem__)
    n = len(order)
    middle = [order[n // 2]] if n % 2 else [order[n // 2 - 1], order[n // 2]]
    keys = run.breakdowns[0].keys()
    return {k: statistics.fmean(run.breakdowns[i][k] for i in middle) for k in keys}


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def errors(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    y = output.detach().double()
    ref = reference.detach().double()
    max_abs = float((y - ref).abs().max())
    scale = float(ref.abs().max())
    flat_y = y.reshape(y.shape[0], -1)
    flat_ref = ref.reshape(ref.shape[0], -1)
    cosine = torch.nn.functional.cosine_similarity(flat_y, flat_ref, dim=1)
    return {
        "max_abs_err": max_abs,
        "rel_err": max_abs / scale if scale > 0 else max_abs,
        "cosine_min": float(cosine.min()),
    }


def exactness(output: torch.Tensor, reference: torch.Tensor | None,
              note: str | None) -> dict[str, Any]:  # fmt: skip
    if reference is None:
        return {"max_abs_err": None, "rel_err": None, "cosine_min": None,
                "exactness": note or "exactness not checked: no sealed reference"}  # fmt: skip
    return {**errors(output, reference), "exactness": "against the sealed reference"}


def summarise(run: ModeRun, reference: torch.Tensor | None, batch: int, seq: int, model: str,
              note: str | None = None) -> dict:  # fmt: skip
    assert run.output is not None, "summarise needs at least one timed forward"
    median_s = statistics.median(run.latencies_s)
    topup_s = statistics.median(run.topup_s) if run.topup_s else 0.0
    result: dict[str, Any] = {
        "model": model,
        "mode": run.mode,
        "batch": batch,
        "seq": seq,
        "latency_ms": {
            "median": median_s * 1e3,
            "p10": _quantile(run.latencies_s, 0.1) * 1e3,
            "p90": _quantile(run.latencies_s, 0.9) * 1e3,
            "min": min(run.latencies_s) * 1e3,  # the least disturbed forward on a shared host
        },
        "throughput": batch / median_s,
        # what a user sustains: every forward also needs its masks drawn and u = op(r, W'')
        "mask_generation_ms": topup_s * 1e3,
        "sustained_throughput": batch / (median_s + topup_s),
        "cpu_ms": {"median": statistics.median(run.cpu_s) * 1e3} if run.cpu_s else None,
        # the result checks' share of each forward (inside de-obfuscation), when --verify
        "integrity_ms": statistics.median(run.integrity_s) * 1e3 if run.integrity_s else None,
        **exactness(run.output, reference, note),
        "breakdown_ms": median_breakdown(run),
        "repeat": len(run.latencies_s),
        "rpc_calls": int(statistics.median(run.calls)),
        "bytes_per_forward": int(statistics.median(run.bytes_moved)),
        "published_bytes": int(getattr(run.transport, "published_bytes", 0)),
        "setup_s": run.setup_s,
        **protocol_facts(run.module),
    }
    audit = getattr(run.module, "audit", None)
    if audit is not None:
        result["audit"] = audit.report()
    note = getattr(run.module, "audit_note", None)
    if note:
        result["audit_note"] = note
    return result


def protocol_facts(module: nn.Module) -> dict[str, Any]:
    """What the protected model says about itself: layers offloaded, mask pool use and cost."""
    stats = getattr(module, "stats", None)
    if stats is None:  # tee-only: nothing offloaded
        return {"offloaded_layers": 0, "mask_offline_s": None}
    facts = stats()
    masks = facts.get("masks")
    return {
        "offloaded_layers": facts.get("offloaded_layers"),
        "scheme": facts.get("scheme"),
        "mask_offline_s": masks["offline"]["seconds"] if masks else None,
        "mask_offline_pairs": masks["offline"]["pairs"] if masks else None,
        "mask_online_refill_s": masks["online_refill"]["seconds"] if masks else None,
        "masks": masks,
        "secrets": facts.get("secrets"),
        "integrity": facts.get("integrity"),
    }


def benchmark(
    prepared: Prepared,
    modes: Sequence[str],
    make_transport: Callable[[str], Transport],
    *,
    model_name: str,
    batch: int,
    seq: int,
    repeat: int,
    warmup: int,
    seed: int | None,
    audit: bool,
    on_progress: Callable[[str], None] | None = None,
    audit_forwards: int = 1,
    verify: bool = False,
) -> list[dict[str, Any]]:
    """Builds every mode, runs them interleaved, returns one result per mode, closes transports."""
    say = on_progress or (lambda _text: None)
    runs: list[ModeRun] = []
    transports: list[Transport] = []
    memory: dict[str, Any] = {}
    try:
        for mode in modes:
            transports.append(make_transport(mode))
            runs.append(build_mode(prepared, mode, transports[-1], seed, audit, verify))
            layers = protocol_facts(runs[-1].module)["offloaded_layers"]
            say(f"{mode}: {layers} layers offloaded, set up in {runs[-1].setup_s:.1f} s")
        say(f"timing {len(runs)} mode(s): {warmup} warmup + {repeat} interleaved forwards each")
        run_interleaved(runs, prepared.inputs, repeat, warmup, audit_forwards)
        memory = peak_memory(transports)
    except BaseException:
        for transport in transports:  # the first failure is the one to report
            with contextlib.suppress(GroupCoverError):
                transport.close()
        raise
    for transport in transports:
        transport.close()
    real_batch = real_batch_of(prepared)
    results = [summarise(run, prepared.reference, real_batch, seq, model_name,
                         prepared.reference_note) for run in runs]  # fmt: skip
    for run, result in zip(runs, results, strict=True):
        result["peak_rss_mb"] = memory
        if prepared.key_release is not None:
            result["key_release"] = prepared.key_release["label"]
        published = getattr(run.transport, "published_by_reference", None)
        if published is not None:
            result["published_by_reference"] = published
        result["paired_ratios"] = {
            other.mode: ratio_summary(paired_ratios(run, other))
            for other in runs
            if other is not run
        }
    if real_batch != batch:
        for result in results:
            result["requested_batch"] = batch
    return results


def peak_memory(transports: Sequence[Transport]) -> dict[str, Any]:
    """Peak resident sets in MiB: this master's (getrusage) and its worker's (asked over the
    wire; None over transports that cannot ask)."""
    from groupcover.worker import peak_rss_bytes

    worker = None
    for transport in transports:
        ask = getattr(transport, "worker_peak_rss", None)
        if ask is not None:
            value = ask()
            worker = None if value is None else round(value / MiB, 1)
            break
    return {"master": round(peak_rss_bytes() / MiB, 1), "worker": worker}


def run_master(
    settings: RankSettings,
    prepared: Prepared,
    on_progress: Callable[[str], None] | None = None,
    make_transport: Callable[[str], Transport] | None = None,
) -> dict[str, Any]:
    """`make_transport(mode)` opens one session per mode (default: torch-rpc, already joined)."""
    from groupcover.transport import TORCH_RPC_WARNING

    assert settings.worker is not None
    worker = settings.worker

    if make_transport is None:
        from groupcover.rpc import RpcTransport

        def make_transport(mode: str) -> Transport:
            return RpcTransport(worker, owner=f"{settings.rank}/{mode}",
                                timeout_s=settings.timeout_s)  # fmt: skip

    transport_facts: dict[str, Any] = {"transport": settings.transport}
    if settings.transport == "torch-rpc":
        transport_facts["transport_warning"] = TORCH_RPC_WARNING

    modes = list(settings.modes)
    if settings.pool_compare:
        modes += [m + UNBOUNDED for m in settings.modes if _masked(m)]
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
    )
    for result in results:
        result.update(rank=settings.rank, worker=worker, world_size=settings.world_size,
                      **transport_facts)  # fmt: skip
    return {
        "results": results,
        "host": host_info(),
        "settings": {
            "rank": settings.rank,
            "world_size": settings.world_size,
            "worker": worker,
            **transport_facts,
            "force_tcp": settings.force_tcp,
            "threads": settings.threads,
            "warmup": settings.warmup,
            "seed": settings.seed,
            "secrets": secrets_label(settings.seed),
            "verify": settings.verify,
            "audit_forwards": settings.audit_forwards if settings.audit else 0,
            "model_load_s": prepared.load_s,
            "model": settings.model,
            "package": _package_facts(prepared),
            "key_release": prepared.key_release,
            "mask_budget_bytes": prepared.mask_budget,
            "exactness": prepared.reference_note or "against the sealed reference",
            "peak_rss_mb": results[0].get("peak_rss_mb") if results else None,
            **settings.extra,
        },
    }


def _package_facts(prepared: Prepared) -> dict[str, Any] | None:
    if not prepared.packages:
        return None
    seen = {id(p): p for p in prepared.packages.values()}
    return {
        "packages": [
            {
                "package_id": p.package_id,
                "scheme": p.meta["scheme"],
                "modes": list(p.modes),
                "baselines": bool(p.meta.get("baselines")),
            }
            for p in seen.values()
        ],
        "protected_on_the_fly_s": round(prepared.protect_s, 2) if prepared.cleanup else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": list(os.getloadavg()),
    }


def write_json(document: dict[str, Any], path: Path | None, settings: RankSettings) -> Path:
    if path is None:  # a package's folder name, never its path (no folders made in the cwd)
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(settings.model)).name).strip("-.")
        path = Path(f"groupcover-{label or 'model'}-rank{settings.rank}.json")
    target = path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return target.resolve()


# (numerator, denominator): the ratios the benchmark exists to show
RATIO_PAIRS = (
    ("groupcover-nomask", "plain-offload"),  # obfuscation's own overhead, unmasked
    ("groupcover", "mask-only"),  # obfuscation's own overhead, same hiding masks
    ("mask-only", "plain-offload"),  # the price of hiding the input
    ("groupcover", "plain-offload"),
    ("plain-offload", "tee-only"),  # does offloading pay at all
    ("hardened-nomask", "plain-offload"),  # the hardened scheme's own overhead, unmasked
    ("hardened", "mask-only"),  # the hardened scheme's own overhead, same hiding masks
)


def overheads(results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each mode against plain-offload: the median of ratios of forwards of the same round
    where the benchmark paired them, else the ratio of medians."""
    base = {
        (r["model"], r["batch"], r["seq"]): r["latency_ms"]["median"]
        for r in results
        if r["mode"] == BASELINE_MODE
    }
    out: dict[str, float | None] = {}
    for r in results:
        paired = (r.get("paired_ratios") or {}).get(BASELINE_MODE)
        if r["mode"] == BASELINE_MODE:
            out[r["mode"]] = 1.0 if (r["model"], r["batch"], r["seq"]) in base else None
        elif paired:
            out[r["mode"]] = paired["median"]
        else:
            ref = base.get((r["model"], r["batch"], r["seq"]))
            out[r["mode"]] = r["latency_ms"]["median"] / ref if ref else None
    return out


def ratio_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """The headline ratios, each with its spread over the paired forwards (how stable it is)."""
    by_mode = {r["mode"]: r for r in results}
    lines = []
    for top, bottom in RATIO_PAIRS:
        if top not in by_mode or bottom not in by_mode:
            continue
        summary = (by_mode[top].get("paired_ratios") or {}).get(bottom)
        if not summary:
            continue
        lines.append(
            f"{top} / {bottom} = {summary['median']:.3f} (interquartile "
            f"{summary['p25']:.3f}-{summary['p75']:.3f} over {summary['pairs']} paired forwards)"
        )
    return lines


def mask_budget_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """Say when a bounded mask pool made masked forwards draw pairs inside the forward: their
    latency is then not that of a full pool."""
    lines = []
    for r in results:
        masks = r.get("masks") or {}
        used = masks.get("used") or 0
        online = (masks.get("online_refill") or {}).get("pairs") or 0
        if used and online:
            budget = masks.get("budget_bytes")
            bound = "" if budget is None else f" (mask budget {budget / MiB:.0f} MiB)"
            lines.append(
                f"{r['mode']}: {online / used:.0%} of its mask pairs were drawn inside the "
                f"forwards{bound}; --mask-budget none draws every pair ahead"
            )
    return lines


def audit_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"{r['mode']}: {r['audit_note']}" for r in results if r.get("audit_note")]
    for r in results:
        report = r.get("audit")
        if not report or r["mode"] == "tee-only":
            continue
        leaks = report.get("leaks", [])
        state = "no leak" if not leaks else f"{len(leaks)} leak(s), e.g. {leaks[0]}"
        exposed = "input exposed" if report.get("input_exposed") else "input hidden"
        figures = [
            f"{row['features']} features x {row['tokens']} tokens: max |corr| "
            f"{row['max_abs_correlation']:.4f} (noise floor {row['noise_floor']:.4f}), "
            f"distinguisher advantage {row['distinguisher_advantage']:.4f}"
            for row in report.get("leakage", [])
        ]
        lines.append(
            f"audit {r['mode']}: {state}; {exposed}; checks took {report.get('check_s', 0):.2f} s "
            "off the timed path" + (f"; leakage {figures[0]}" if figures else "")
        )
    return lines


def secrets_label(seed: int | None) -> str:
    from groupcover.rng import OS_NOTICE, seed_notice

    return OS_NOTICE if seed is None else seed_notice(seed)


def print_table(document: dict[str, Any]) -> None:
    results = document["results"]
    ratio = overheads(results)
    load = document.get("host", {}).get("loadavg")
    title = "GroupCover benchmark" + (f" (host load {load[0]:.2f} at the end)" if load else "")
    headers = (
        "model",
        "mode",
        "batch",
        "seq",
        "median ms",
        "p10",
        "p90",
        "samples/s",
        "sustained/s",
        "masks ms",
        "rel err",
        "vs plain-offload",
        "master",
        "deobf",
        "transfer",
        "worker",
        "calls",
        "MB/fwd",
    )
    rows = []
    for r in results:
        lat, parts = r["latency_ms"], r["breakdown_ms"]
        rows.append((
            r["model"], r["mode"], str(r["batch"]), str(r["seq"]),
            f"{lat['median']:.1f}", f"{lat['p10']:.1f}", f"{lat['p90']:.1f}",
            f"{r['throughput']:.2f}", f"{r.get('sustained_throughput', r['throughput']):.2f}",
            f"{r.get('mask_generation_ms', 0.0):.1f}",
            "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}",
            "-" if ratio[r["mode"]] is None else f"{ratio[r['mode']]:.3f}x",
            f"{parts['master_compute']:.1f}", f"{parts['deobfuscation']:.1f}",
            f"{parts['transfer']:.1f}", f"{parts['worker_compute']:.1f}",
            str(r["rpc_calls"]), f"{r['bytes_per_forward'] / 1e6:.2f}",
        ))  # fmt: skip
    print(texttable.render(title, headers, rows, left=2), flush=True)
    settings = document.get("settings", {})
    notes = [
        "latency: wall time of a forward with the mask pool full; sustained: samples/s with "
        "the masks of each forward generated too (masks ms)",
        *ratio_lines(results),
        *mask_budget_lines(results),
        *audit_lines(results),
    ]
    for r in results:
        if r.get("integrity_ms") is not None:
            share = r["integrity_ms"] / r["latency_ms"]["median"]
            notes.append(f"integrity check {r['mode']}: {r['integrity_ms']:.1f} ms per forward "
                         f"({share:.1%} of its latency), every worker result checked")  # fmt: skip
    if "seed" in settings:
        notes.append(secrets_label(settings["seed"]))
    if settings.get("key_release"):
        notes.append(f"model key: {settings['key_release']['label']}")
    if settings.get("exactness") and settings["exactness"].startswith("exactness not checked"):
        notes.append(settings["exactness"])
    if settings.get("peak_rss_mb"):
        rss = settings["peak_rss_mb"]
        notes.append(f"peak RSS: master {rss['master']} MiB, worker "
                     f"{'-' if rss['worker'] is None else rss['worker']} MiB")  # fmt: skip
    if settings.get("transport"):
        notes.append(f"transport: {settings['transport']}")
    if settings.get("transport_warning"):
        notes.append(f"WARNING: {settings['transport_warning']}")
    for note in notes:
        print(note, flush=True)


# ---- local front ends ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalRun:
    """`bench --local`: a master and a worker as two processes on loopback."""

    launch_args: tuple[str, ...]  # model, modes, sizes, json... passed to the master
    force_tcp: bool = True
    timeout_s: float = 600.0
    port: int = 0  # 0: pick a free one
    transport: str = "tcp"
    worker_args: tuple[str, ...] = ()  # e.g. --package DIR (the worker's copy of the package)

    def argv(self, role: str, port: int) -> list[str]:
        argv = [sys.executable, "-m", "groupcover", "launch", "--role", role,
                "--rank", "0" if role == "master" else "1", "--world-size", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--ifname", "lo",
                "--timeout", f"{self.timeout_s:g}", "--transport", self.transport]  # fmt: skip
        if self.force_tcp:
            argv.append("--force-tcp")
        if role == "master":
            argv += ["--worker", "1", *self.launch_args]
        else:
            argv += list(self.worker_args)
        return argv


def run_local(local: LocalRun) -> int:
    port = local.port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(local.argv("worker", port), env=env)
    try:
        master = subprocess.run(local.argv("master", port), env=env, check=False)
        if master.returncode != 0:
            return master.returncode
        return worker.wait(timeout=local.timeout_s)
    except subprocess.TimeoutExpired:
        print("groupcover: error: the local worker did not exit after the master", file=sys.stderr)
        return 3
    finally:
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def run_micro(batch: int, seq: int, repeat: int, json_path: Path | None, threads: int) -> int:
    """De-obfuscation cost against the plain linear layer, BERT-base shapes, one process."""
    from groupcover.obfuscate import bench_deobfuscation

    torch.set_num_threads(threads)
    rows = bench_deobfuscation(batch=batch, seq=seq, repeat=max(repeat, 5), threads=threads)
    linear = sum(r["linear_ms"] for r in rows)
    restore = sum(r["restore_ms"] for r in rows)
    prepare = sum(r["prepare_ms"] for r in rows)
    title = f"De-obfuscation vs plain linear (batch {batch} x seq {seq}, {threads} thread)"
    headers = (
        "in",
        "out",
        "linear ms",
        "restore ms",
        "permute ms",
        "restore / linear",
        "features-first ms",
        "features-first / linear",
    )
    table = [
        (
            str(r["in_features"]), str(r["out_features"]),
            *(f"{r[key]:.2f}" for key in ("linear_ms", "restore_ms", "prepare_ms")),
            f"{r['ratio']:.1%}",
            f"{r['restore_features_first_ms']:.2f}", f"{r['ratio_features_first']:.1%}",
        )
        for r in rows
    ]  # fmt: skip
    print(texttable.render(title, headers, table))
    summary = {
        "linear_ms": linear,
        "restore_ms": restore,
        "prepare_ms": prepare,
        "ratio": restore / linear,
        "ratio_with_permute": (restore + prepare) / linear,
        "ratio_features_first": sum(r["restore_features_first_ms"] for r in rows) / linear,
    }
    print(
        f"restore / plain linear, all shapes: {summary['ratio']:.1%} "
        f"(with the input permutation: {summary['ratio_with_permute']:.1%})",
        flush=True,
    )
    if json_path is not None:
        document = {"micro": rows, "summary": summary, "host": host_info()}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"{RESULT_MARK} {json_path.resolve()}", flush=True)
    return 0
