"""The mode engine: builds every mode from the prepared model, runs them on the same inputs
interleaved (round robin, so slow drifts of a shared host hit every mode alike), checks each
against the reference and returns one result per mode (`benchmark`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from groupcover.bench.rate import serve_at_rate
from groupcover.bench.stats import (
    UNBOUNDED,
    ModeRun,
    base_mode,
    paired_ratios,
    protocol_facts,
    ratio_summary,
    speedup_bounds,
    summarise,
)
from groupcover.errors import GroupCoverError
from groupcover.models import as_tensor
from groupcover.modes import build_for_mode
from groupcover.package.prepare import Prepared
from groupcover.timing import Timings
from groupcover.transport import Transport
from groupcover.worker import peak_rss_bytes

MiB = 1 << 20


def real_batch_of(prepared: Prepared) -> int:
    """The batch the model really ran: the leading dimension of its inputs and its output."""
    if prepared.reference is not None:
        return int(prepared.reference.shape[0])
    return int(prepared.inputs[0].shape[0])


def build_mode(
    prepared: Prepared,
    mode: str,
    transport: Transport,
    seed: int | None,
    audit: bool,
    verify: bool = True,
) -> ModeRun:
    """Builds the model for one mode: from its package (no obfuscation: the secrets are sealed,
    the published weights go by reference) or, for a plaintext model, obfuscated here; then one
    mask pair per layer for the first forward (offline; with later top-ups, reported as
    `mask_offline_s`)."""
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
    mask_side = mask_worker_timings(run.transport)
    if mask_side is not None:
        mask_side.reset()
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
        if mask_side is not None:  # the mask worker's calls and bytes are the forward's too
            run.calls[-1] += mask_side.calls
            run.bytes_moved[-1] += mask_side.bytes_sent + mask_side.bytes_received
            run.mask_worker_s.append(mask_side.worker_s)
        if checked is not None:
            run.integrity_s.append((_integrity_seconds(run.module) or 0.0) - checked)
    start = time.perf_counter()
    topped = top_up_masks(run.module, inputs)
    if timed and topped:
        run.topup_s.append(time.perf_counter() - start)


def mask_worker_timings(transport: Transport) -> Timings | None:
    """The mask worker's bookkeeping where the transport has one (the `-2w` modes)."""
    mask_transport = getattr(transport, "mask_transport", None)
    return None if mask_transport is None else mask_transport.timings


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
    verify: bool = True,
    request_rate: float | None = None,
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
        if request_rate is not None:
            say(f"serving {repeat} requests per mode at {request_rate:g} requests/s")
            for run in runs:
                run.protocol = protocol_facts(run.module)  # the timed forwards' pool figures
                run.at_rate = serve_at_rate(run, prepared.inputs, request_rate, repeat,
                                            real_batch_of(prepared))  # fmt: skip
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
    speedup_bounds(results)
    return results


def peak_memory(transports: Sequence[Transport]) -> dict[str, Any]:
    """Peak resident sets in MiB: this master's (getrusage) and its worker's (asked over the
    wire; None over transports that cannot ask)."""
    worker = None
    for transport in transports:
        ask = getattr(transport, "worker_peak_rss", None)
        if ask is not None:
            value = ask()
            worker = None if value is None else round(value / MiB, 1)
            break
    return {"master": round(peak_rss_bytes() / MiB, 1), "worker": worker}
