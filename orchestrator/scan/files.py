"""Files: raw bytes, and a qcow2's guest-visible disk (through `qemu-img map`, or `qemu-img convert`
when some clusters are compressed)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.scan.common import (
    ScanInputError,
)
from orchestrator.scan.index import Index
from orchestrator.scan.stream import Hit, file_reader, scan_stream

QCOW2_MAGIC = b"QFI\xfb"


def is_qcow2(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == QCOW2_MAGIC


def qcow2_extents(path: Path) -> list[dict[str, Any]] | None:
    """`qemu-img map` of the whole backing chain; None when some data cannot be read in place
    (compressed or encrypted clusters)."""
    proc = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        raise ScanInputError(f"qemu-img cannot map {path}: {proc.stderr.strip()[:200]}")
    extents = json.loads(proc.stdout)
    data = [e for e in extents if e.get("data")]
    if any("offset" not in e or e.get("compressed") for e in data):
        return None
    return data


def _chain_files(path: Path) -> dict[int, Path]:
    """depth -> file of the backing chain (qemu-img info --backing-chain)."""
    proc = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ScanInputError(f"qemu-img cannot read {path}: {proc.stderr.strip()[:200]}")
    return {depth: Path(info["filename"]) for depth, info in enumerate(json.loads(proc.stdout))}


def _runs(extents: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Data extents grouped into runs contiguous in the guest (a hole ends a run)."""
    run: list[dict[str, Any]] = []
    for e in extents:
        if run and run[-1]["start"] + run[-1]["length"] != e["start"]:
            yield run
            run = []
        run.append(e)
    if run:
        yield run


def _extent_reader(
    run: list[dict[str, Any]], files: Mapping[int, BinaryIO]
) -> Callable[[int], bytes]:
    pieces = iter(run)
    state: dict[str, Any] = {"left": 0, "file": None}

    def read(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if state["left"] == 0:
                e = next(pieces, None)
                if e is None:
                    break
                f = files[int(e.get("depth", 0))]
                f.seek(int(e["offset"]))
                state["file"], state["left"] = f, int(e["length"])
            chunk = state["file"].read(min(n - len(out), state["left"]))
            if not chunk:
                break
            state["left"] -= len(chunk)
            out += chunk
        return bytes(out)

    return read


@dataclass
class Scanned:
    file: str
    view: str
    bytes: int
    seconds: float
    note: str = ""


def scan_file(
    path: Path, index: Index, tmp_dir: Path | None = None
) -> tuple[list[Hit], list[Scanned]]:
    hits: list[Hit] = []
    done: list[Scanned] = []
    start = time.perf_counter()
    with path.open("rb") as f:
        found, size = scan_stream(file_reader(f), index, str(path), "raw")
    hits += found
    done.append(Scanned(str(path), "raw", size, time.perf_counter() - start))
    if not is_qcow2(path):
        return hits, done
    start = time.perf_counter()
    extents = qcow2_extents(path)
    if extents is not None:
        chain = _chain_files(path)
        handles = {depth: file.open("rb") for depth, file in chain.items()}
        try:
            size = 0
            for run in _runs(extents):
                found, got = scan_stream(_extent_reader(run, handles), index, str(path), "guest",
                                         base=int(run[0]["start"]))  # fmt: skip
                hits += found
                size += got
        finally:
            for handle in handles.values():
                handle.close()
        done.append(Scanned(str(path), "guest", size, time.perf_counter() - start,
                            "qemu-img map extents"))  # fmt: skip
        return hits, done
    with tempfile.TemporaryDirectory(prefix="gcvm-scan-", dir=tmp_dir) as folder:
        raw = Path(folder) / "guest.raw"
        proc = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise ScanInputError(f"qemu-img cannot convert {path}: {proc.stderr.strip()[:200]}")
        with raw.open("rb") as f:
            found, size = scan_stream(file_reader(f), index, str(path), "guest")
    hits += found
    done.append(Scanned(str(path), "guest", size, time.perf_counter() - start,
                        "qemu-img convert -O raw (compressed clusters)"))  # fmt: skip
    return hits, done


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files under the given paths (folders walked, links not followed), each once."""
    out: dict[Path, None] = {}
    for path in paths:
        if path.is_symlink() or not path.exists():
            if not path.exists() and not path.is_symlink():
                raise ScanInputError(f"no such file or folder {path}")
            continue
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                for name in sorted(files):
                    item = Path(root) / name
                    if item.is_file() and not item.is_symlink():
                        out[item] = None
        elif path.is_file():
            out[path] = None
    return list(out)
