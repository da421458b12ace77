"""How the payload audit (`groupcover.audit`) recognises a plaintext weight or a secret in a
payload: a signature index of weight rows (random projections, sorted, confirmed by cosine) and a
bank of secret vectors, matched by correlation (affine images) or exactly (short vectors and
tables). Kept apart from the audit's bookkeeping so each file reads on its own.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXACT_COSINE = 0.99999  # signature matches are confirmed above this cosine
AFFINE_LIMIT = 0.9999  # |Pearson| of a payload row/column with a secret vector
SIGNATURE_TOL = 1e-4
SHORT_VECTOR = 16  # shorter secret vectors are only matched exactly (correlation means little)
NOISE_FLOOR_SEED = 20240721  # the audit's own randomness (signatures, noise floors): not secret


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    t = f64(t)
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def nearly_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() != b.numel() or a.numel() == 0:
        return False
    x, y = f64(a).reshape(-1), f64(b).reshape(-1)
    scale = max(float(y.abs().max()), 1e-12)
    return bool((x - y).abs().max() <= 1e-5 * scale)


def _informative(m: torch.Tensor) -> torch.Tensor:
    """Rows that can identify something: not (nearly) constant, not zero."""
    spread = m.amax(dim=1) - m.amin(dim=1)
    return spread > 1e-9 * m.abs().amax(dim=1).clamp(min=1e-300)


@dataclass(frozen=True, eq=False)
class _Table:
    kind: str
    width: int
    canon: torch.Tensor  # canonical unit rows, float32, in signature order
    sig: torch.Tensor  # (rows, 2) float64 signatures, sorted by the first
    label: str


class _TableSet:
    """One matrix's tables (weak-referenceable, so the process-wide cache can share them)."""

    def __init__(self, tables: list[_Table]) -> None:
        self.tables = tables


_PROJECTIONS: dict[int, torch.Tensor] = {}
_SHARED_TABLES: weakref.WeakValueDictionary[tuple[object, ...], _TableSet] = (
    weakref.WeakValueDictionary()
)


class SignatureIndex:
    """Rows of plaintext matrices by two random projections of a canonical form of each row.

    `direct`: the unit row with its sign fixed, so a scaled or negated copy has the same
    signature. `sorted`: the unit vector of the row's sorted magnitudes, the same for any
    permutation of its entries. A query row whose signature lies within `SIGNATURE_TOL` of an
    indexed one is confirmed by the cosine of the canonical vectors themselves.
    """

    def __init__(self) -> None:
        # per (kind, width): one sorted table per added matrix (no rebuild when layers join)
        self._tables: dict[tuple[str, int], list[_Table]] = {}
        self._held: list[_TableSet] = []  # keeps the shared tables alive while this index lives

    @staticmethod
    def _projection(width: int) -> torch.Tensor:
        if width not in _PROJECTIONS:
            g = torch.Generator().manual_seed(NOISE_FLOOR_SEED + width)
            _PROJECTIONS[width] = torch.randn(width, 2, generator=g, dtype=torch.float64)
        return _PROJECTIONS[width]

    @staticmethod
    def canonical(kind: str, rows: torch.Tensor) -> torch.Tensor:
        if kind == "sorted":
            rows = rows.abs().sort(dim=1).values
        unit = F.normalize(rows, dim=1)
        if kind == "direct":
            first = unit.gather(1, unit.abs().argmax(dim=1, keepdim=True))
            unit = unit * torch.where(first < 0, -1.0, 1.0)
        return unit

    def add(self, label: str, matrix: torch.Tensor) -> None:
        """Index `matrix`'s rows; the tables are shared with every other audit in the process
        that indexes the same matrix under the same label (the benchmark audits several modes
        of one model), and freed when the last audit holding them goes."""
        key = (label, tuple(matrix.shape), *fingerprint(matrix))
        tables = _SHARED_TABLES.get(key)
        if tables is None:
            tables = _TableSet(self._build(label, matrix))
            _SHARED_TABLES[key] = tables
        for table in tables.tables:
            self._tables.setdefault((table.kind, table.width), []).append(table)
        self._held.append(tables)

    def _build(self, label: str, matrix: torch.Tensor) -> list[_Table]:
        m = as_matrix(matrix)
        m = m[_informative(m)]
        if m.shape[0] == 0:
            return []
        built = []
        for kind in ("direct", "sorted"):
            canon = self.canonical(kind, m)
            sig = canon @ self._projection(m.shape[1])
            order = sig[:, 0].argsort()
            # unit rows in float32 (half the memory; the confirming cosine is taken in float64
            # against the float64 query, off by < 1e-6 for rows of a few thousand entries)
            canon32 = canon[order].to(torch.float32)
            built.append(_Table(kind, m.shape[1], canon32, sig[order].contiguous(), label))
            del canon
        return built

    def matches(self, kind: str, rows: torch.Tensor) -> set[str]:
        """Labels of indexed matrices one of whose rows some query row reproduces."""
        rows = rows[_informative(rows)] if rows.numel() else rows
        if rows.shape[0] == 0:
            return set()
        tables = self._tables.get((kind, rows.shape[1]))
        if not tables:
            return set()
        query = self.canonical(kind, rows)
        qsig = query @ self._projection(rows.shape[1])
        low = (qsig[:, 0] - SIGNATURE_TOL).contiguous()
        high = (qsig[:, 0] + SIGNATURE_TOL).contiguous()
        found: set[str] = set()
        for table in tables:
            canon, sig, label = table.canon, table.sig, table.label
            if label in found:
                continue
            lo = torch.searchsorted(sig[:, 0].contiguous(), low)
            hi = torch.searchsorted(sig[:, 0].contiguous(), high)
            counts = (hi - lo).clamp(min=0)
            total = int(counts.sum())
            if total == 0:
                continue
            # every (query, candidate) pair of the windows, vectorised: the sorted signatures
            # of a weight's rows lie close together, so windows can hold many candidates
            qi = torch.repeat_interleave(torch.arange(len(counts)), counts)
            starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            ji = lo[qi] + (torch.arange(total) - starts)
            near = (sig[ji, 1] - qsig[qi, 1]).abs() <= SIGNATURE_TOL
            qi, ji = qi[near], ji[near]
            cos = (canon[ji].to(torch.float64) * query[qi]).sum(dim=1)
            if qi.numel() and bool((cos > EXACT_COSINE).any()):
                found.add(label)
        return found


def payload_views(payload: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The payload's rows, and its columns (a transposed copy of something)."""
    m = as_matrix(payload)
    yield "rows", m
    if m.shape[0] > 1:
        yield "columns", m.t()
    if payload.dim() > 2:  # a convolution input: channels are axis 1
        channels = f64(payload).movedim(1, -1).reshape(-1, payload.shape[1])
        yield "channels", channels.t()


class SecretBank:
    """Every registered secret vector by length, centred and normalised, so that one matrix
    product per payload view finds any row or column that is an affine image of one of them;
    short vectors and (G, k, k) tables are matched exactly."""

    def __init__(self) -> None:
        self._vectors: dict[int, list[tuple[torch.Tensor, tuple[str, str]]]] = {}
        self._tables: dict[int, list[tuple[torch.Tensor, tuple[str, str]]]] = {}
        self._dense: dict[int, tuple[torch.Tensor, list[tuple[str, str]]]] = {}

    def add_vector(self, owner: str, name: str, vector: torch.Tensor) -> None:
        v = vector.reshape(-1)
        if v.numel() < 2 or bool((v == v[0]).all()):
            return
        self._vectors.setdefault(v.numel(), []).append((v, (owner, name)))
        self._dense.pop(v.numel(), None)

    def add_table(self, owner: str, name: str, table: torch.Tensor) -> None:
        k = table.shape[-1]
        rows = table.reshape(-1, k)
        rows = rows[(rows != 0).sum(dim=1) > 1]  # identity rows of padded slots match too much
        if k >= 2 and rows.numel():
            self._tables.setdefault(k, []).append((rows, (owner, name)))

    def table_widths(self) -> set[int]:
        return set(self._tables)

    def _centred(self, n: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        if n not in self._dense:
            entries = self._vectors[n]
            bank = torch.stack([v for v, _ in entries])
            bank = F.normalize(bank - bank.mean(dim=1, keepdim=True), dim=1)
            self._dense[n] = (bank, [label for _, label in entries])
        return self._dense[n]

    def hits(self, m: torch.Tensor) -> set[tuple[str, str]]:
        n = m.shape[1]
        entries = self._vectors.get(n)
        if not entries:
            return set()
        found: set[tuple[str, str]] = set()
        if n < SHORT_VECTOR:
            for v, label in entries:
                scale = max(float(v.abs().max()), 1e-12) * 1e-5
                if bool(((m - v).abs().amax(dim=1) <= scale).any()):
                    found.add(label)
            return found
        bank, labels = self._centred(n)
        rows = F.normalize(m - m.mean(dim=1, keepdim=True), dim=1)
        corr = (rows @ bank.t()).abs().amax(dim=0)
        for j in torch.nonzero(corr > AFFINE_LIMIT).flatten().tolist():
            found.add(labels[j])
        return found

    def table_hits(self, payload: torch.Tensor) -> set[tuple[str, str]]:
        k = payload.shape[-1]
        candidates = f64(payload).reshape(-1, k)
        found: set[tuple[str, str]] = set()
        for rows, label in self._tables.get(k, []):
            distance = torch.cdist(candidates, rows)
            scale = rows.abs().amax(dim=1).clamp(min=1e-12)
            if bool((distance <= 1e-5 * scale).any()):
                found.add(label)
        return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint(t: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    """A tensor's content (dtype, shape, BLAKE2b of its bytes): the shared-table cache's key and
    the mask-reuse check's stamp. A hash, not a random projection: under emulation drawing a
    projection vector as long as the tensor costs more than hashing it."""
    data = t.detach().cpu().contiguous().reshape(-1)
    raw = data.view(torch.uint8).numpy().data.cast("B") if data.numel() else memoryview(b"")
    return dtype_name(t.dtype), tuple(t.shape), hashlib.blake2b(raw, digest_size=16).hexdigest()
