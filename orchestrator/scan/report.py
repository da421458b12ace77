"""A scan of files for the targets of a checkpoint, and its report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.scan.common import (
    DTYPES,
    ScanInputError,
)
from orchestrator.scan.files import Scanned, expand, scan_file
from orchestrator.scan.index import build_index
from orchestrator.scan.stream import Hit
from orchestrator.scan.tensors import checkpoint_file, read_safetensors, select_targets


@dataclass
class Report:
    checkpoint: str
    targets: int
    vectors: int
    fingerprints: int
    scanned: list[Scanned]
    hits: list[Hit]
    seconds: float

    @property
    def clean(self) -> bool:
        return not self.hits

    def groups(self) -> list[dict[str, Any]]:
        grouped: dict[tuple[str, str, str, str, str], list[Hit]] = {}
        for h in sorted(self.hits, key=lambda h: (h.file, h.view, h.offset)):
            grouped.setdefault((h.file, h.view, h.tensor, h.orientation, h.dtype), []).append(h)
        out = []
        for (file, view, tensor, orientation, dtype), group in grouped.items():
            first = group[0]
            out.append({
                "file": file, "view": view, "tensor": tensor, "orientation": orientation,
                "dtype": dtype, "vectors_found": len({h.index for h in group}),
                "first": {"offset": first.offset, "index": first.index,
                          "matched_bytes": first.matched, "vector_bytes": first.length},
                "offsets": [h.offset for h in group[:8]],
            })  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean, "checkpoint": self.checkpoint, "targets": self.targets,
            "vectors": self.vectors, "fingerprints": self.fingerprints,
            "dtypes": list(DTYPES), "seconds": round(self.seconds, 2),
            "scanned": [dataclasses.asdict(s) for s in self.scanned],
            "hits": self.groups(),
        }  # fmt: skip


def scan(model: Path, paths: list[Path], tensors: str | None = None,
         tmp_dir: Path | None = None) -> Report:  # fmt: skip
    start = time.perf_counter()
    checkpoint = checkpoint_file(model)
    targets = select_targets(read_safetensors(checkpoint), tensors)
    files = expand(paths)
    if not files:
        raise ScanInputError("nothing to scan: the given folders hold no file")
    index = build_index(targets)
    hits: list[Hit] = []
    scanned: list[Scanned] = []
    for file in files:
        try:
            found, done = scan_file(file, index, tmp_dir)
        except OSError as exc:
            raise ScanInputError(f"cannot read {file}: {exc.strerror or exc}") from None
        hits += found
        scanned += done
    vectors = sum(s.data.shape[0] for s in index.sets)
    return Report(str(checkpoint), len(targets), vectors, int(index.keys.size), scanned, hits,
                  time.perf_counter() - start)  # fmt: skip
