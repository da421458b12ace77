"""What one mode's forwards measured (`ModeRun`), and the figures made of it: paired latency
ratios, quantiles, errors against the reference, and a mode's result record (`summarise`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from groupcover.integrity import NOT_CHECKED
from groupcover.modes import UnknownMode, protection
from groupcover.transport import Transport

UNBOUNDED = " (unbounded pool)"  # a --pool-compare run: the same mode with today's mask pool


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
    mask_worker_s: list[float] = field(default_factory=list)  # the mask worker's compute (-2w)
    output: torch.Tensor | None = None
    at_rate: dict[str, Any] | None = None  # served at --request-rate (`bench.rate`)
    protocol: dict[str, Any] | None = None  # `protocol_facts` as the timed forwards left them

    def clear(self) -> None:
        for series in (self.latencies_s, self.breakdowns, self.calls, self.bytes_moved,
                       self.cpu_s, self.topup_s, self.integrity_s,
                       self.mask_worker_s):  # fmt: skip
            series.clear()


def base_mode(label: str) -> str:
    return label.removesuffix(UNBOUNDED)


def paired_ratios(run: ModeRun, base: ModeRun) -> list[float]:
    """Latency ratios of forwards of the same round: slow drifts of a shared host cancel."""
    return [a / b for a, b in zip(run.latencies_s, base.latencies_s, strict=False) if b > 0]


def ratio_summary(ratios: Sequence[float]) -> dict[str, float] | None:
    if not ratios:
        return None
    return {
        "median": statistics.median(ratios),
        "p25": quantile(ratios, 0.25),
        "p75": quantile(ratios, 0.75),
        "pairs": len(ratios),
    }


def median_breakdown(run: ModeRun) -> dict[str, float]:
    """The parts of the median forward(s): they add up to the median latency itself."""
    order = sorted(range(len(run.latencies_s)), key=run.latencies_s.__getitem__)
    n = len(order)
    middle = [order[n // 2]] if n % 2 else [order[n // 2 - 1], order[n // 2]]
    keys = run.breakdowns[0].keys()
    return {k: statistics.fmean(run.breakdowns[i][k] for i in middle) for k in keys}


def quantile(values: Sequence[float], q: float) -> float:
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
            "p10": quantile(run.latencies_s, 0.1) * 1e3,
            "p90": quantile(run.latencies_s, 0.9) * 1e3,
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
        **(run.protocol or protocol_facts(run.module)),
    }
    result.update(check_facts(result))
    result.update(mode_protection(run.mode))
    if run.at_rate is not None:
        result["at_rate"] = run.at_rate
    if run.mask_worker_s:  # the -2w modes: u = op(r, W'') computed by the mask worker
        result["mask_worker_compute_ms"] = statistics.median(run.mask_worker_s) * 1e3
    audit = getattr(run.module, "audit", None)
    if audit is not None:
        result["audit"] = audit.report()
    mask_audit = getattr(run.module, "mask_audit", None)
    if mask_audit is not None:
        result["mask_worker_audit"] = mask_audit.report()
    note = getattr(run.module, "audit_note", None)
    if note:
        result["audit_note"] = note
    return result


def mode_protection(mode: str) -> dict[str, Any]:
    """`protected` and its label (`groupcover.modes.protection`); a mode name the benchmark
    does not know (a baseline of its own) says nothing."""
    try:
        return protection(mode)
    except UnknownMode:
        return {}


def check_facts(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the worker's results were checked (None: no worker results, nothing offloaded),
    and what the check guarantees in one line (`integrity.checked_label`)."""
    if not result.get("offloaded_layers"):
        return {"results_checked": None, "integrity_check": "no worker results (nothing offloaded)"}
    integrity = result.get("integrity")
    if integrity is None:
        return {"results_checked": False, "integrity_check": NOT_CHECKED}
    return {"results_checked": True, "integrity_check": integrity["label"]}


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


TEE_ONLY = "tee-only"
NO_TEE_ONLY = "tee-only did not run in this run (add it to --modes for the bounds)"
NO_CPU = "no master CPU time recorded for this mode or for tee-only"


def _ratio(top: float, bottom: float) -> float | None:
    return top / bottom if bottom > 0 else None


def speedup_bounds(results: Sequence[dict[str, Any]]) -> None:
    """Adds to each result the most an infinitely fast worker could speed a forward up over
    tee-only: `speedup_bound` = tee-only's master CPU per forward / this mode's, and
    `speedup_bound_sustained` = the same with this mode's mask generation per forward added to
    its CPU. Only against tee-only of the same run (model, batch, seq); else both are None and
    `speedup_bound_note` says why. A bound below 1: slower than tee-only whatever the worker."""
    tee = {
        (r["model"], r["batch"], r["seq"]): (r.get("cpu_ms") or {}).get("median")
        for r in results
        if r["mode"] == TEE_ONLY
    }
    for r in results:
        key = (r["model"], r["batch"], r["seq"])
        base, own = tee.get(key), (r.get("cpu_ms") or {}).get("median")
        bound = sustained = None
        if key not in tee:
            note: str | None = NO_TEE_ONLY
        elif base is None or own is None:
            note = NO_CPU
        else:
            bound = _ratio(base, own)
            sustained = _ratio(base, own + (r.get("mask_generation_ms") or 0.0))
            note = None if bound is not None else NO_CPU
        r["speedup_bound"], r["speedup_bound_sustained"] = bound, sustained
        r["speedup_bound_note"] = note
