"""The evaluation's table (plain text), JSON and chart (matplotlib, imported only when drawn)."""

from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path
from typing import Any

from groupcover.texttable import render as render_table


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per scheme x attack: error ratio min / median over the matrices, mean delta
    cosine, mean permutation accuracy."""
    rows = []
    for run in result["schemes"]:
        matrices = [n for n in run["layers"] if not n.endswith("attention.qkv")]
        attacks = list(run["layers"][matrices[0]]) if matrices else []
        for attack in attacks:
            ratios = [run["layers"][m][attack]["error_ratio"] for m in matrices]
            cosines = [run["layers"][m][attack]["delta_cos"] for m in matrices]
            perms = [run["layers"][m][attack]["perm_acc"] for m in matrices]
            perms = [p for p in perms if p is not None]
            rows.append([
                run["label"], attack, _fmt(min(ratios)), _fmt(statistics.median(ratios)),
                _fmt(statistics.mean(cosines)), _fmt(statistics.mean(perms)) if perms else "-",
            ])  # fmt: skip
    return rows


def layer_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per weight matrix: each scheme's best error ratio over all attacks (and which attack)."""
    runs = result["schemes"]
    header = ["matrix"] + [r["label"] for r in runs]
    names = [n for n in runs[0]["layers"] if not n.endswith("attention.qkv")] if runs else []
    rows = []
    for name in names:
        row = [name]
        for run in runs:
            per = run["layers"][name]
            best = min(per, key=lambda a: per[a]["error_ratio"])
            row.append(f"{per[best]['error_ratio']:.3f} {best}")
        rows.append(row)
    return header, rows


def stealing_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, acc in result["stealing"].items():
        rows.append([label, _fmt(acc["accuracy"]), _fmt(acc["std"])])
    for run in result["schemes"]:
        acc = run["stolen"]
        rows.append([f"{run['label']} (best reconstruction)", _fmt(acc["accuracy"]),
                     _fmt(acc["std"])])  # fmt: skip
    return rows


def render(result: dict[str, Any], per_layer: bool = True) -> str:
    victim = result["victim"]
    parts = [
        f"victim: MiniLM-L6 fine-tuned on the topic task, test accuracy "
        f"{victim['test_accuracy']:.3f}",
        "error ratio = ||W_rec - W_vic|| / ||W_pub - W_vic|| (below 1: the attacker learned the "
        "fine-tuning); over the weight matrices (q, k, v scored apart)",
        render_table(
            "every scheme x attack",
            ["scheme", "attack", "ratio min", "ratio median", "delta cos", "perm acc"],
            summary_rows(result),
            left=2,
        ),
    ]
    if per_layer:
        header, rows = layer_rows(result)
        parts.append(
            render_table("best attack per weight matrix (error ratio, attack)", header, rows, 1)
        )
    settings = result["settings"]
    if settings.get("steal", "head") == "finetune":
        how = (
            f"the encoder and a head fine-tuned on {settings['queries']} victim labels "
            f"({settings['steal_steps']} steps of {settings['steal_batch']})"
        )
    else:
        how = f"a head trained on {settings['queries']} victim labels over the frozen encoder"
    title = f"stolen accuracy: {how}, mean and spread over {len(settings['steal_seeds'])} seeds"
    parts.append(render_table(title, ["thief", "accuracy", "std"], stealing_rows(result), 1))
    return "\n\n".join(parts)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def chart(result: dict[str, Any], path: Path) -> None:
    """Best error ratio per weight matrix, one line per scheme (needs matplotlib)."""
    # host-side only (guests have no matplotlib): imported by name, never at module import
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    header, rows = layer_rows(result)
    fig, ax = plt.subplots(figsize=(12, 5))
    for col, label in enumerate(header[1:], start=1):
        ax.plot([float(r[col].split()[0]) for r in rows], marker="o", ms=3, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.99, color="red", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)), [r[0].replace("layer.", "") for r in rows], rotation=90,
                  fontsize=6)  # fmt: skip
    ax.set_ylabel("best error ratio over all attacks")
    ax.set_title(
        "Security evaluation: reconstruction error ratio per weight matrix (lower = broken)"
    )
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
