"""The secret tensors: the owner's checkpoint read with a small safetensors parser on numpy, the
targets chosen, and their bytes in each dtype looked for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.scan.common import (
    DEFAULT_SKIP,
    ScanInputError,
)

if TYPE_CHECKING:
    import numpy as np
else:
    from orchestrator.scan.common import np

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": None}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every floating tensor of a safetensors file, as float32 arrays (bfloat16 widened)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ScanInputError(f"{path} is not a safetensors file: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _ST_DTYPES:
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        dtype = _ST_DTYPES[info["dtype"]]
        if dtype is None:  # bfloat16: the upper half of a float32
            wide = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = wide.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype).astype(np.float32)
        out[name] = array.reshape(info["shape"])
    return out


def checkpoint_file(src: Path) -> Path:
    if src.is_dir():
        if not (src / "model.safetensors").is_file():
            raise ScanInputError(
                f"{src} holds no model.safetensors",
                hint="--model is the owner's checkpoint folder or a .safetensors file of the "
                "secret weights (for the stand-in: python -m groupcover.models.standin --out DIR)",
            )
        return src / "model.safetensors"
    if src.is_file():
        return src
    raise ScanInputError(f"no such checkpoint {src}", hint="give the owner's checkpoint folder")


def select_targets(
    tensors: dict[str, np.ndarray], pattern: str | None = None
) -> dict[str, np.ndarray]:
    """The tensors to look for: REGEX matches, or every >= 2-D weight and its bias, embeddings
    excepted."""
    if pattern is not None:
        try:
            wanted = re.compile(pattern)
        except re.error as exc:
            raise ScanInputError(
                f"--tensors {pattern!r} is not a regular expression: {exc}"
            ) from None
        chosen = {n: t for n, t in tensors.items() if wanted.search(n) and t.size >= 8}
    else:
        weights = {n for n, t in tensors.items() if t.ndim >= 2 and not DEFAULT_SKIP.search(n)}
        biases = {n for n in tensors if n.endswith(".bias") and n[:-5] + ".weight" in weights}
        chosen = {n: tensors[n] for n in sorted(weights | biases) if tensors[n].size >= 8}
    if not chosen:
        raise ScanInputError(
            "no tensor of the checkpoint to look for",
            hint="--tensors REGEX chooses them by name (default: every matrix and its bias, "
            "embeddings excepted)",
        )
    return chosen


def as_dtype_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """(n, L) float32 -> (n, L * itemsize) uint8, little-endian, in dtype (bfloat16: RNE)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        out = values.astype("<f4")
    elif dtype == "float16":
        out = values.astype("<f2")
    else:
        bits = values.view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return out.view(np.uint8).reshape(values.shape[0], -1)
