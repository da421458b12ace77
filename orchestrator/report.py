"""Turn the masters' benchmark JSON into what people read: a table and a PNG chart.

Pure functions of the collected documents, so they are tested without VMs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

BREAKDOWN_KEYS = ("master_compute", "deobfuscation", "transfer", "worker_compute")
BASELINE_MODE = "plain-offload"


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten {master_vm: document} into one row per (master, mode) with the overhead ratio."""
    out: list[dict[str, Any]] = []
    for master, doc in sorted(runs.items()):
        results = doc.get("results", [])
        base = {
            (r["model"], r["batch"], r["seq"]): r["latency_ms"]["median"]
            for r in results
            if r["mode"] == BASELINE_MODE
        }
        for r in results:
            ref = base.get((r["model"], r["batch"], r["seq"]))
            overhead = r["latency_ms"]["median"] / ref if ref else None
            out.append({"master": master, **r, "overhead": overhead})
    return out


def aggregate(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode across masters: the summed throughput (masters run concurrently) and worst error."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows(runs):
        by_mode[row["mode"]].append(row)
    agg = []
    for mode, items in by_mode.items():
        agg.append(
            {
                "mode": mode,
                "masters": len(items),
                "throughput": sum(i["throughput"] for i in items),
                "latency_median_ms": statistics.median(i["latency_ms"]["median"] for i in items),
                # None: no master checked exactness (no sealed reference for the shape)
                "rel_err": max(
                    (i["rel_err"] for i in items if i.get("rel_err") is not None), default=None
                ),
            }
        )
    return agg


def table(runs: dict[str, dict[str, Any]], title: str) -> Table:
    labels = {str(r.get("key_release") or "-") for r in rows(runs)}
    shared = len(labels) == 1  # one label for every row (the usual case): say it once
    caption = [f"key release: {next(iter(labels))}"] if shared else []
    caption += check_captions(runs)
    caption += bound_captions(runs)
    t = Table(title=title, title_justify="left", caption="\n".join(caption) or None,
              caption_justify="left")  # fmt: skip
    t.add_column("master")
    t.add_column("mode")
    for col in (
        "median ms",
        "p10-p90 ms",
        "samples/s",
        "rel err",
        "vs plain-offload",
        "master",
        "deobf",
        "transfer",
        "worker",
        "CPU ms",
        "bound",
        "sust. bound",
    ):
        t.add_column(col, justify="right")
    if not shared:
        t.add_column("key release")
    for r in rows(runs):
        lat, parts = r["latency_ms"], r.get("breakdown_ms", {})
        t.add_row(
            r["master"], r["mode"], _fmt(lat["median"]), f"{lat['p10']:.0f}-{lat['p90']:.0f}",
            _fmt(r["throughput"], ".2f"), rel_err_text(r),
            "-" if r["overhead"] is None else f"{r['overhead']:.3f}x",
            *(_fmt(parts.get(key)) for key in ("master_compute", "deobfuscation", "transfer",
                                               "worker_compute")),
            _fmt((r.get("cpu_ms") or {}).get("median")), bound_text(r.get("speedup_bound")),
            bound_text(r.get("speedup_bound_sustained")),
            *(() if shared else (str(r.get("key_release") or "-"),)),
        )  # fmt: skip
    return t


def check_captions(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Whether the workers' results were checked: one line per distinct verdict (`results_checked`
    per result; a result from before the key existed counts as not checked)."""
    lines: dict[str, None] = {}
    for r in rows(runs):
        if r.get("offloaded_layers") == 0:
            continue  # tee-only: no worker results
        if r.get("results_checked"):
            lines[
                "results checked (Freivalds: every element of every result; tolerance and "
                "false-accept per mode: integrity_check in bench.json)"
            ] = None
        else:
            lines[f"{r['mode']}: results NOT checked (--no-verify)"] = None
    return list(lines)


SLOWER = "slower than tee-only even with an infinitely fast worker"


def bound_text(value: float | None) -> str:
    """A speed-up bound over tee-only (the framework's `speedup_bound*`), * below 1."""
    return "-" if value is None else f"{value:.2f}" + ("*" if value < 1 else "")


def bound_captions(runs: dict[str, dict[str, Any]]) -> list[str]:
    """What the bounds mean, why any is missing (`speedup_bound_note`), and each (master, mode)
    whose bound is below 1: it cannot beat tee-only however fast the worker."""
    data = rows(runs)
    if not any("speedup_bound" in r for r in data):
        return []  # documents from before the bounds
    lines = [
        "CPU ms: the master's CPU per forward; bound: tee-only's CPU ms / the mode's (the most an "
        "infinitely fast worker could speed a forward up over tee-only); sust. bound: with the "
        "mode's mask generation added; * below 1"
    ]
    lines += list(dict.fromkeys(f"no speed-up bounds: {r['speedup_bound_note']}"
                                for r in data if r.get("speedup_bound_note")))  # fmt: skip
    for r in data:
        bound, sustained = r.get("speedup_bound"), r.get("speedup_bound_sustained")
        if bound is not None and bound < 1:
            lines.append(f"{r['master']} {r['mode']}: bound {bound:.2f} < 1: {SLOWER}")
        elif sustained is not None and sustained < 1:
            lines.append(f"{r['master']} {r['mode']}: sustained bound {sustained:.2f} < 1: "
                         f"{SLOWER} once its masks are generated too")  # fmt: skip
    return lines


def rel_err_text(row: dict[str, Any]) -> str:
    """The error against the sealed reference, or why there is none (`rel_err` null)."""
    value = row.get("rel_err")
    if value is None:
        return "not checked" if "rel_err" in row else "-"
    return format(value, ".1e")


def key_releases(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per master: how its model key came (the framework's settings.key_release)."""
    return {m: (doc.get("settings") or {}).get("key_release") for m, doc in sorted(runs.items())}


def key_release_table(runs: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="Model key release", title_justify="left")
    for col in ("master", "how", "source", "attested", "broker", "packages", "TEE", "seconds"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for master, facts in key_releases(runs).items():
        facts = facts or {}
        seconds = facts.get("seconds")
        pins = (facts.get("broker_identity") or {}).get("source")
        broker = _verdict(facts, "broker_authenticated", f"pinned ({pins})")
        packages = _verdict(facts, "package_authenticated", "signed by the owner")
        t.add_row(master, str(facts.get("label", "-")), str(facts.get("source", "-")),
                  "yes" if facts.get("attested") else "no", broker, packages,
                  str(facts.get("tee") or "-"),
                  "-" if seconds is None else f"{float(seconds):.3f}")  # fmt: skip
    return t


def _verdict(facts: dict[str, Any], key: str, yes: str) -> str:
    """A release's authentication fact as the table says it ("-": the master did not say)."""
    if key not in facts:
        return "-"
    return yes if facts[key] else "NOT authenticated"


_CLAIMS = ("measurement", "reported_tcb", "vmpl", "signing_key", "chip_id", "mr_td", "rtmrs",
           "tcb_status", "debug", "policy")  # fmt: skip


def broker_verdicts(decisions: Sequence[dict[str, Any]],
                    names: dict[str, str]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per master (by the address its requests came from): the broker's own record of what it
    decided — the keys it released, whether it verified evidence, the verified claims it
    released them on (measurement, TCB, ...), under which policy file — and any refusal."""
    found: dict[str, dict[str, Any]] = {}
    for d in decisions:
        who = names.get(str(d.get("peer") or ""), str(d.get("peer") or "unknown client"))
        entry = found.setdefault(who, {"released": [], "refused": [], "attested": None,
                                       "tee": None, "claims": {}, "policy": d.get("policy"),
                                       "policy_sha256": d.get("policy_sha256")})  # fmt: skip
        if d.get("outcome") == "released":
            entry["released"].append(d.get("resource"))
            entry["attested"] = bool(d.get("attested")) and entry["attested"] is not False
            entry["tee"] = d.get("tee")
            evaluation = d.get("evaluation") or {}
            entry["claims"] = {k: evaluation[k] for k in _CLAIMS if k in evaluation}
            if not d.get("attested"):
                entry["claims"] = {"warning": evaluation.get("warning", "no evidence")}
        elif d.get("outcome") == "refused":
            entry["refused"].append(f"{d.get('step')}: {d.get('reason')}")
    return found


def broker_table(verdicts: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="The key broker's decisions (its own record, per master)",
              title_justify="left")  # fmt: skip
    for col in ("master", "keys released", "evidence", "claims it released on", "policy",
                "refused"):  # fmt: skip
        t.add_column(col)
    for master, v in sorted(verdicts.items()):
        evidence = ("verified " + str(v.get("tee")) if v.get("attested")
                    else "none (insecure broker)" if v["released"] else "-")  # fmt: skip
        claims = ", ".join(f"{k} {str(val)[:24]}" for k, val in v["claims"].items()) or "-"
        policy = "-" if not v.get("policy") else (
            f"{v['policy']}" + (f" ({str(v['policy_sha256'])[:12]}...)"
                                if v.get("policy_sha256") else ""))  # fmt: skip
        t.add_row(master, str(len(v["released"])), evidence, claims, policy,
                  "; ".join(v["refused"]) or "-")  # fmt: skip
    return t


def peak_rss(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per master and mode: the framework's peak RSS per rank (MiB; `peak_rss_mb`)."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows(runs):
        if row.get("peak_rss_mb") is not None:
            found.setdefault(row["master"], {})[row["mode"]] = row["peak_rss_mb"]
    return found


def peak_rss_table(runs: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="Peak RSS per rank (the processes' own ru_maxrss, MiB; cumulative over the "
              "modes of one run)", title_justify="left")  # fmt: skip
    for col in ("master", "mode", "master rank", "worker rank"):
        t.add_column(col, justify="left" if col in ("master", "mode") else "right")
    for master, modes in peak_rss(runs).items():
        for mode, value in modes.items():
            value = value if isinstance(value, dict) else {"master": value}
            t.add_row(master, mode, _fmt(value.get("master")), _fmt(value.get("worker")))
    return t


def aggregate_table(runs: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="All masters together", title_justify="left")
    t.add_column("mode")
    t.add_column("masters", justify="right")
    t.add_column("aggregate samples/s", justify="right")
    t.add_column("median of medians ms", justify="right")
    t.add_column("worst rel err", justify="right")
    for a in aggregate(runs):
        t.add_row(
            a["mode"],
            str(a["masters"]),
            f"{a['throughput']:.2f}",
            f"{a['latency_median_ms']:.1f}",
            "not checked" if a["rel_err"] is None else f"{a['rel_err']:.2e}",
        )
    return t


def chart(runs: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Stacked bars of each (master, mode)'s median breakdown, whiskers from p10 to p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(runs)
    labels = [f"{r['mode']}\n{r['master']}" if len(runs) > 1 else r["mode"] for r in data]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(data) + 2), 4.5))
    bottoms = [0.0] * len(data)
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for key, color in zip(BREAKDOWN_KEYS, colors, strict=True):
        vals = [float(r.get("breakdown_ms", {}).get(key, 0.0)) for r in data]
        ax.bar(labels, vals, bottom=bottoms, color=color, label=key.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    med = [r["latency_ms"]["median"] for r in data]
    lo = [m - r["latency_ms"]["p10"] for m, r in zip(med, data, strict=True)]
    hi = [r["latency_ms"]["p90"] - m for m, r in zip(med, data, strict=True)]
    ax.errorbar(labels, med, yerr=[lo, hi], fmt="k_", capsize=4, label="median (p10-p90)")
    ax.set_ylabel("latency per forward (ms)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(r["latency_ms"]["p90"] for r in data) * 1.35)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
