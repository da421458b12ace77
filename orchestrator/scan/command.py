"""`gcvm scan`: the command line, its output and exit status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from orchestrator.scan.common import (
    ScanInputError,
)
from orchestrator.scan.host import host_files
from orchestrator.scan.report import Report, scan
from orchestrator.ui import out


def _print(report: Report) -> None:
    total = sum(s.bytes for s in report.scanned)
    out.print(f"scanned {len({s.file for s in report.scanned})} file(s), {total / 1e9:.2f} GB "
              f"(raw bytes; qcow2 also guest-visible) in {report.seconds:.1f} s for "
              f"{report.targets} tensors ({report.vectors} rows/columns x float32/float16/"
              f"bfloat16, {report.fingerprints} fingerprints) from "
              f"{report.checkpoint}")  # fmt: skip
    for g in report.groups():
        first = g["first"]
        out.print(f"HIT {g['file']} ({g['view']}) at {first['offset']}: {g['tensor']} "
                  f"{g['orientation']} {first['index']} in {g['dtype']} "
                  f"({first['matched_bytes']} of {first['vector_bytes']} bytes; "
                  f"{g['vectors_found']} {g['orientation']}s of it found)")  # fmt: skip
    out.print("clean: no plaintext tensor found" if report.clean else
              f"{len(report.hits)} plaintext vector(s) found")  # fmt: skip


def scan_cmd(
    model: Path = typer.Option(
        ..., "--model",
        help="The owner's checkpoint folder (model.safetensors) or a .safetensors file of the "
        "secret weights.",
    ),
    paths_: list[Path] = typer.Option(
        None, "--paths", help="Files or folders to scan (qcow2 images also through qemu-img)."
    ),
    more: list[Path] = typer.Argument(None, help="More files or folders (after --paths)."),
    cluster: str | None = typer.Option(
        None, "--cluster", help="Also scan every file gcvm wrote on this host for that cluster."
    ),
    tensors: str | None = typer.Option(
        None, "--tensors",
        help="REGEX: the tensors to look for (default: every matrix and its bias, embeddings "
        "excepted).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:  # fmt: skip
    """Search files, images and overlays for the plaintext weights of a secret model (float32,
    float16, bfloat16; rows and columns). Exit 1 on a hit, 0 when clean, 2 on bad input."""
    targets = list(paths_ or []) + list(more or [])
    if cluster is not None:
        targets += host_files(cluster)
    if not targets:
        raise ScanInputError("nothing to scan", hint="give --paths FILE... or --cluster NAME")
    if shutil.which("qemu-img") is None and any(p.suffix == ".qcow2" for p in targets):
        raise ScanInputError("qemu-img is not installed (needed for qcow2 images)")
    report = scan(model, targets, tensors)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print(report)
    if not report.clean:
        raise typer.Exit(1)
