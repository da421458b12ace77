"""`gcvm scan`: search files for the plaintext weights of a secret model.

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

from orchestrator.scan.command import scan_cmd
from orchestrator.scan.common import DTYPES, MIN_MATCH, STRIDE, WINDOW, ScanInputError
from orchestrator.scan.files import Scanned, expand, is_qcow2, qcow2_extents, scan_file
from orchestrator.scan.host import NOT_WRITTEN, host_files
from orchestrator.scan.index import Index, VectorSet, build_index
from orchestrator.scan.report import Report, scan
from orchestrator.scan.stream import Hit, scan_stream
from orchestrator.scan.tensors import (
    as_dtype_bytes,
    checkpoint_file,
    read_safetensors,
    select_targets,
)

__all__ = [
    "DTYPES",
    "MIN_MATCH",
    "NOT_WRITTEN",
    "STRIDE",
    "WINDOW",
    "Hit",
    "Index",
    "Report",
    "ScanInputError",
    "Scanned",
    "VectorSet",
    "as_dtype_bytes",
    "build_index",
    "checkpoint_file",
    "expand",
    "host_files",
    "is_qcow2",
    "qcow2_extents",
    "read_safetensors",
    "scan",
    "scan_cmd",
    "scan_file",
    "scan_stream",
    "select_targets",
]
