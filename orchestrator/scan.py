"""`gcvm scan`: search files for the plaintext weights of a secret model (issue 11, point 6).

The tensors to look for come from the owner's own checkpoint (`--model SRC`: a Hugging Face
folder holding `model.safetensors`, or a `.safetensors` file), read here with a small
safetensors parser on numpy: the orchestrator never imports the framework, and the parser reads
bfloat16 checkpoints, which numpy cannot hold (they are widened to float32). By default every
weight of two or more dimensions and its bias is a target, except embeddings (what a package
offloads, and more: biases are sealed, not offloaded); `--tensors REGEX` chooses others.

For each target, each row and (for a matrix) each column, in float32, float16 and bfloat16
(round to nearest even), little-endian, is a *vector*. A file is read in 32 MiB chunks and
sampled every `STRIDE` (16) bytes: the 8 bytes at each sampled offset are hashed into a bitmap
of every vector's fingerprints. A vector's fingerprints are its 8-byte windows at the 16 byte
offsets after every `ANCHOR` (512) bytes of it, so any copy of a vector (or of any 536-byte piece
of one), at any byte offset of the file, puts one fingerprint on a sampled offset. A bitmap hit is
looked up exactly (sorted keys), then confirmed by comparing the file's bytes with the vector's
around it: a hit is at least `MIN_MATCH` (64) contiguous bytes of one vector, as far as it goes.
Windows of fewer than 4 distinct bytes are no fingerprint (zeros, repeated values), and the
hash is chosen so that no repeated-byte word (a zeroed or filled region) falls on a set bit.

Files: raw bytes of every file (a qcow2's own bytes hold every uncompressed cluster of its layer);
for a qcow2 also the guest-visible disk in guest order, from `qemu-img map --output=json` (data
extents read from whichever file of the backing chain holds them, zeros skipped), or through
`qemu-img convert -O raw` into a temporary file when some clusters are compressed. Not covered:
encrypted qcow2 (LUKS) data, compressed or archived files (gzip, zip, xz: wheels are zips, but
their members are usually deflated), float64 copies, other byte orders, quantised or
re-scaled copies, and a vector cut into pieces shorter than 536 bytes (a fragmented file system
block can cut a row; the other rows of its tensor are still found).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import typer

from orchestrator.errors import UsageError

STRIDE = 16  # the file is sampled every STRIDE bytes
WINDOW = 8  # bytes per fingerprint (one uint64)
ANCHOR = 512  # a vector's fingerprints start every ANCHOR bytes (STRIDE offsets each)
MIN_MATCH = 64  # contiguous bytes of one vector that make a hit
MIN_DISTINCT = 4  # distinct byte values a fingerprint needs
CHUNK = 32 << 20
DEFAULT_SKIP = re.compile(r"embedding", re.IGNORECASE)
DTYPES = ("float32", "float16", "bfloat16")

if TYPE_CHECKING:
    import numpy as np
else:

    class _Numpy:  # numpy on first use: `gcvm` imports this module at every start
        def __getattr__(self, name: str) -> Any:
            import numpy

            return getattr(numpy, name)

    np = _Numpy()
QCOW2_MAGIC = b"QFI\xfb"
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": None}


class ScanInputError(UsageError):
    """A bad --model or --paths: one line, exit 2."""


# ---- the secret tensors ------------------------------------------------------------------------


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


@dataclass
class VectorSet:
    """One tensor's rows or columns in one dtype: the bytes each vector has in a file."""

    tensor: str
    orientation: str  # row | column
    dtype: str
    data: np.ndarray  # (count, length) uint8
    base: int  # global id of vector 0


@dataclass
class Index:
    sets: list[VectorSet]
    keys: np.ndarray  # sorted uint64 fingerprints
    vector: np.ndarray  # int64 global vector id per key
    offset: np.ndarray  # int64 byte offset of the key in its vector
    bitmap: np.ndarray  # uint8, one bit per hash slot
    bits: int
    multiplier: int
    margin: int  # the longest vector, rounded up to STRIDE
    targets: dict[str, list[int]] = field(default_factory=dict)  # name -> shape

    def locate(self, vector_id: int) -> tuple[VectorSet, int]:
        bases = [s.base for s in self.sets]
        at = int(np.searchsorted(bases, vector_id, side="right")) - 1
        return self.sets[at], vector_id - self.sets[at].base

    def hash(self, words: np.ndarray) -> np.ndarray:
        return (words * np.uint64(self.multiplier)) >> np.uint64(64 - self.bits)

    def candidates(self, words: np.ndarray) -> np.ndarray:
        """Indices of words whose hash hits the bitmap."""
        slots = self.hash(words)
        byte = self.bitmap[slots >> np.uint64(3)]
        return np.flatnonzero((byte >> (slots & np.uint64(7)).astype(np.uint8)) & 1)


def _fingerprints(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a (count, length) uint8 block: windows at the STRIDE offsets after
    every ANCHOR bytes; keys (count, k), offsets (k,)."""
    length = data.shape[1]
    starts = [a + t for a in range(0, max(length - WINDOW - STRIDE, 0) + 1, ANCHOR)
              for t in range(STRIDE) if a + t + WINDOW <= length]  # fmt: skip
    offsets = np.array(starts, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(data, WINDOW, axis=1)[:, offsets, :]
    keys = np.ascontiguousarray(windows).view("<u8")[..., 0]
    return keys, offsets


def _distinct_enough(keys: np.ndarray) -> np.ndarray:
    as_bytes = np.sort(keys.view(np.uint8).reshape(-1, WINDOW), axis=1)
    return (np.count_nonzero(np.diff(as_bytes, axis=1), axis=1) + 1) >= MIN_DISTINCT


def build_index(targets: dict[str, np.ndarray], dtypes: Iterable[str] = DTYPES) -> Index:
    sets: list[VectorSet] = []
    base = 0
    for name, tensor in targets.items():
        matrix = tensor.reshape(tensor.shape[0], -1) if tensor.ndim >= 2 else tensor.reshape(1, -1)
        views = [("row", matrix)] + ([("column", matrix.T)] if tensor.ndim >= 2 else [])
        for orientation, values in views:
            for dtype in dtypes:
                data = as_dtype_bytes(values, dtype)
                if data.shape[1] < WINDOW + STRIDE:
                    continue
                sets.append(VectorSet(name, orientation, dtype, data, base))
                base += data.shape[0]
    if not sets:
        raise ScanInputError("the chosen tensors are too small to look for (< 24 bytes a row)")
    all_keys, all_vec, all_off = [], [], []
    for s in sets:
        keys, offsets = _fingerprints(s.data)
        vec = np.broadcast_to(np.arange(s.data.shape[0], dtype=np.int64)[:, None] + s.base,
                              keys.shape)  # fmt: skip
        off = np.broadcast_to(offsets[None, :], keys.shape)
        good = _distinct_enough(keys.ravel())
        all_keys.append(keys.ravel()[good])
        all_vec.append(vec.ravel()[good])
        all_off.append(off.ravel()[good])
    keys = np.concatenate(all_keys)
    order = np.argsort(keys, kind="stable")
    keys, vector, offset = (
        keys[order],
        np.concatenate(all_vec)[order],
        np.concatenate(all_off)[order],
    )
    bits = int(min(max(24, int(np.ceil(np.log2(max(keys.size, 1) * 64)))), 31))
    margin = -(-max(s.data.shape[1] for s in sets) // STRIDE) * STRIDE
    common = np.array([int.from_bytes(bytes([b]) * WINDOW, "little") for b in range(256)],
                      dtype=np.uint64)  # fmt: skip
    for multiplier in _MULTIPLIERS:
        index = Index(sets, keys, vector, offset, np.zeros(1 << (bits - 3), np.uint8), bits,
                      multiplier, margin)  # fmt: skip
        slots = index.hash(keys)
        np.bitwise_or.at(index.bitmap, slots >> np.uint64(3),
                         (1 << (slots & np.uint64(7))).astype(np.uint8))  # fmt: skip
        if index.candidates(common).size == 0:
            break
    index.targets = {n: list(t.shape) for n, t in targets.items()}
    return index


# ---- searching a byte stream -------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    file: str
    view: str  # raw | guest
    offset: int  # where the vector's first byte would be (may precede a partial match)
    tensor: str
    orientation: str
    index: int
    dtype: str
    matched: int  # contiguous bytes of the vector found
    length: int  # the vector's bytes


def _match_length(buf: memoryview, at: int, vector: np.ndarray, off: int) -> int:
    """Contiguous bytes of `vector` equal to `buf` around buf[at] (= vector[off])."""
    start = max(0, at - off)
    end = min(len(buf), at - off + vector.size)
    region = np.frombuffer(buf[start:end], np.uint8)
    ours = vector[start - (at - off) : start - (at - off) + region.size]
    equal = region == ours
    local = at - start
    if not equal[local : local + WINDOW].all():
        return 0
    forward = np.flatnonzero(~equal[local:])
    back = np.flatnonzero(~equal[:local][::-1])
    return (int(forward[0]) if forward.size else equal.size - local) + (
        int(back[0]) if back.size else local
    )


def scan_stream(read: Callable[[int], bytes], index: Index, name: str, view: str,
                base: int = 0) -> tuple[list[Hit], int]:  # fmt: skip
    """Scans what `read(n)` yields (n bytes, fewer at the end); offsets are reported as
    base + position. Returns (hits, bytes read)."""
    margin = index.margin
    buf = bytearray()
    buf_start = 0  # stream offset of buf[0]
    pos = 0  # next sampled offset to look at (a multiple of STRIDE)
    eof = False
    hits: dict[tuple[int, int], Hit] = {}
    total = 0
    while True:
        want = pos + CHUNK + margin - (buf_start + len(buf))
        if want > 0 and not eof:
            got = read(want)
            total += len(got)
            eof = len(got) < want
            buf += got
        end = buf_start + len(buf)
        limit = end - WINDOW if eof else min(pos + CHUNK, end - margin)
        if limit >= pos:
            first = pos - buf_start
            count = (limit - pos) // STRIDE + 1
            step = STRIDE // 8
            words = np.frombuffer(buf, "<u8", count=(count - 1) * step + 1, offset=first)[::step]
            found = [(first + int(k) * STRIDE, words[k]) for k in index.candidates(words)]
            del words  # no export of buf may outlive this block: it is resized below
            view_buf = memoryview(buf)
            try:
                for at, word in found:
                    lo = int(np.searchsorted(index.keys, word, side="left"))
                    hi = int(np.searchsorted(index.keys, word, side="right"))
                    for j in range(lo, min(hi, lo + 16)):
                        vid, off = int(index.vector[j]), int(index.offset[j])
                        vset, row = index.locate(vid)
                        matched = _match_length(view_buf, at, vset.data[row], off)
                        if matched >= MIN_MATCH:
                            where = base + buf_start + at - off
                            hits.setdefault((vid, where), Hit(
                                name, view, where, vset.tensor, vset.orientation, row,
                                vset.dtype, matched, vset.data.shape[1]))  # fmt: skip
            finally:
                view_buf.release()
            pos += count * STRIDE
        if eof and pos > end - WINDOW:
            break
        drop = max(0, pos - margin - buf_start)
        drop -= drop % STRIDE
        if drop:
            del buf[:drop]
            buf_start += drop
    return list(hits.values()), total


def _file_reader(f: BinaryIO) -> Callable[[int], bytes]:
    return lambda n: f.read(n)


# ---- files: raw bytes, and a qcow2's guest-visible disk ----------------------------------------


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
        found, size = scan_stream(_file_reader(f), index, str(path), "raw")
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
            found, size = scan_stream(_file_reader(f), index, str(path), "guest")
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


# ---- what gcvm writes on the host --------------------------------------------------------------


# state keys that name paths gcvm does not write for the cluster: the checkout and its venv (the
# host worker's), and the owner's own folder and policy file (the cluster broker's record: the
# source checkpoint, the keys and the broker's log live there, by design)
NOT_WRITTEN = frozenset({"python", "root", "owner", "policy", "broker_policy"})


def host_files(cluster: str) -> list[Path]:
    """Every folder and file gcvm writes on the host for a cluster: its state folder (state,
    overlays, seed disks, serial logs, keys, the host worker's folder), its results folder,
    the image it runs (disk, kernel, initrd), and every path its state names (but the checkout
    and its venv, which the host worker runs from). Not here: the model package the user gave
    `gcvm run` (name it to the scan) and the owner's folder (source checkpoint, key, broker)."""
    from orchestrator import paths, state

    found: dict[Path, None] = {}

    def add(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in NOT_WRITTEN:
                    add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)
        elif isinstance(value, str | Path) and str(value).startswith("/"):
            path = Path(value)
            if path.exists() and path not in (Path("/"),) and not _is_system(path):
                found[path] = None

    add(state.cluster_dir(cluster))
    add(paths.state_root() / "results" / cluster)
    if state.exists(cluster):
        st = state.load(cluster)
        add(st.to_dict())
        disk = Path(str(st.image.get("disk") or "/nonexistent"))
        if disk.parent.parent == paths.images_dir():  # the image's folder: kernel, initrd
            add(disk.parent)
    return list(found)


def _is_system(path: Path) -> bool:
    """Paths a state names that gcvm does not write (interpreters, sockets, /dev, /proc)."""
    text = str(path)
    return text.startswith(("/dev", "/proc", "/sys", "/usr", "/bin", "/sbin", "/lib", "/etc")) or (
        path.exists() and not (path.is_file() or path.is_dir())
    )


# ---- gcvm scan -----------------------------------------------------------------------------------


def _print(report: Report) -> None:
    from orchestrator.ui import out

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
