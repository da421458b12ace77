"""A benchmark's document: the host it ran on, the JSON file, and the table and notes shown."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from groupcover import texttable
from groupcover.bench.rate import rate_lines
from groupcover.package.prepare import Prepared
from groupcover.rng import OS_NOTICE, seed_notice

RESULT_MARK = "GROUPCOVER_RESULT_JSON"
BASELINE_MODE = "plain-offload"
MiB = 1 << 20


def package_facts(prepared: Prepared) -> dict[str, Any] | None:
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


def write_json(document: dict[str, Any], path: Path | None, model: str, rank: int) -> Path:
    """Writes the document to `path`, by default ./groupcover-<model label>-rank<rank>.json."""
    if path is None:  # a package's folder name, never its path (no folders made in the cwd)
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model)).name).strip("-.")
        path = Path(f"groupcover-{label or 'model'}-rank{rank}.json")
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


def leakage_figure(row: dict[str, Any]) -> str:
    """One width's leakage figure with its verdict: the null it is judged against (the null's
    median as the noise floor, its (1 - alpha) quantile, the p-value) and what this many tokens
    can detect at all (older documents without the verdict print the figure and floor only)."""
    text = (
        f"{row['features']} features x {row['tokens']} tokens: max |corr| "
        f"{row['max_abs_correlation']:.4f} (noise floor {row['noise_floor']:.4f}"
    )
    if "null_quantile" in row:
        judged = "ABOVE the null" if row["above_null"] else "within the null"
        text += (
            f", null {1 - row['alpha']:.0%} quantile {row['null_quantile']:.4f}, "
            f"p = {row['p_value']:.3g}: {judged}; detects |corr| >= {row['detectable_corr']:.2g} "
            f"with {row['power']:.0%} power; |corr| {row['target_corr']:g} needs "
            f"{row['tokens_for_target']:,} tokens"
        )
    return text + f"), distinguisher advantage {row['distinguisher_advantage']:.4f}"


def audit_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"{r['mode']}: {r['audit_note']}" for r in results if r.get("audit_note")]
    watched = [(r["mode"], r.get("audit")) for r in results]
    watched += [(f"{r['mode']} (mask worker)", r["mask_worker_audit"])
                for r in results if r.get("mask_worker_audit")]  # fmt: skip
    for mode, report in watched:
        if not report or mode == "tee-only":
            continue
        leaks = report.get("leaks", [])
        above = [row for row in report.get("leakage", []) if row.get("above_null")]
        if leaks:
            state = f"{len(leaks)} leak(s), e.g. {leaks[0]}"
        elif above:
            state = (
                f"no leak found by the exact checks, but the payload/input correlation is above "
                f"the null at {above[0]['features']} features (p = {above[0]['p_value']:.3g})"
            )
        else:
            state = "no leak"
        exposed = "input exposed" if report.get("input_exposed") else "input hidden"
        figures = [leakage_figure(row) for row in report.get("leakage", [])]
        lines.append(
            f"audit {mode}: {state}; {exposed}; checks took {report.get('check_s', 0):.2f} s "
            "off the timed path" + (f"; leakage {figures[0]}" if figures else "")
        )
    return lines


def check_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """Per offloading mode: whether its worker's results were checked, what that guarantees and
    what it cost (`results_checked`, `integrity_check`, `integrity_ms`)."""
    lines = []
    for r in results:
        if r.get("results_checked") is None:
            continue  # nothing offloaded: no worker results
        cost = ""
        if r.get("integrity_ms") is not None:
            share = r["integrity_ms"] / r["latency_ms"]["median"]
            cost = f" [{r['integrity_ms']:.1f} ms per forward, {share:.1%} of its latency]"
        lines.append(f"{r['mode']}: {r['integrity_check']}{cost}")
    return lines


def secrets_label(seed: int | None) -> str:
    return OS_NOTICE if seed is None else seed_notice(seed)


def mode_label(result: dict[str, Any]) -> str:
    """The mode as the table prints it: an unmasked mode that offloads says UNPROTECTED."""
    if result.get("protected") is False:
        return f"{result['mode']} UNPROTECTED"
    return str(result["mode"])


def protection_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{r['mode']}: {r['protection']}: the worker sees the input in the clear or under a "
        "fixed secret transform, which its payloads let it estimate"
        for r in results
        if r.get("protected") is False
    ]


SLOWER = "slower than tee-only even with an infinitely fast worker"
BOUNDS_NOTE = (
    "CPU ms: the master's CPU per forward; bound: tee-only's CPU ms / the mode's, the most an "
    "infinitely fast worker could speed a forward up over tee-only; sust. bound: the same with "
    "the mode's mask generation (masks ms) added; * below 1"
)


def cpu_text(result: dict[str, Any]) -> str:
    cpu = result.get("cpu_ms")
    return "-" if not cpu else f"{cpu['median']:.1f}"


def bound_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + ("*" if value < 1 else "")


def bound_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """The bounds' meaning, why any is missing, and every mode that cannot beat tee-only."""
    if not any("speedup_bound" in r for r in results):
        return []  # a document from before the bounds
    lines = [BOUNDS_NOTE]
    lines += list(dict.fromkeys(f"no speed-up bounds: {r['speedup_bound_note']}"
                                for r in results if r.get("speedup_bound_note")))  # fmt: skip
    for r in results:
        bound, sustained = r.get("speedup_bound"), r.get("speedup_bound_sustained")
        if bound is not None and bound < 1:
            lines.append(f"{r['mode']}: bound {bound:.2f} < 1: {SLOWER}")
        elif sustained is not None and sustained < 1:
            lines.append(f"{r['mode']}: sustained bound {sustained:.2f} < 1: {SLOWER} once its "
                         "masks are generated too")  # fmt: skip
    return lines


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
        "CPU ms",
        "bound",
        "sust. bound",
    )
    rows = []
    for r in results:
        lat, parts = r["latency_ms"], r["breakdown_ms"]
        rows.append((
            r["model"], mode_label(r), str(r["batch"]), str(r["seq"]),
            f"{lat['median']:.1f}", f"{lat['p10']:.1f}", f"{lat['p90']:.1f}",
            f"{r['throughput']:.2f}", f"{r.get('sustained_throughput', r['throughput']):.2f}",
            f"{r.get('mask_generation_ms', 0.0):.1f}",
            "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}",
            "-" if ratio[r["mode"]] is None else f"{ratio[r['mode']]:.3f}x",
            f"{parts['master_compute']:.1f}", f"{parts['deobfuscation']:.1f}",
            f"{parts['transfer']:.1f}", f"{parts['worker_compute']:.1f}",
            str(r["rpc_calls"]), f"{r['bytes_per_forward'] / 1e6:.2f}",
            cpu_text(r), bound_text(r.get("speedup_bound")),
            bound_text(r.get("speedup_bound_sustained")),
        ))  # fmt: skip
    print(texttable.render(title, headers, rows, left=2), flush=True)
    settings = document.get("settings", {})
    notes = [
        "latency: wall time of a forward with the mask pool full; sustained: samples/s with "
        "the masks of each forward generated too (masks ms)",
        *ratio_lines(results),
        *bound_lines(results),
        *protection_lines(results),
        *mask_budget_lines(results),
        *rate_lines(results),
        *audit_lines(results),
    ]
    notes += check_lines(results)
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
