"""`bench --micro`: de-obfuscation against a plain linear layer, in one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from groupcover import texttable
from groupcover.bench.report import RESULT_MARK, host_info
from groupcover.obfuscate import bench_deobfuscation


def run_micro(batch: int, seq: int, repeat: int, json_path: Path | None, threads: int) -> int:
    """De-obfuscation cost against the plain linear layer, BERT-base shapes, one process."""
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
