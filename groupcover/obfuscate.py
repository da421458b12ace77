"""GroupCover's offline obfuscation of one layer and the master's online de-obfuscation.

Offline (`obfuscate_layer`): group the output rows by dissimilarity, mix each group with a dense
random integer matrix whose condition number is bounded, permute the input features. The weight
is `(out, in)` for linear layers and `(out, in, *kernel)` for convolutions: rows are output
kernels, the permuted axis is the input channel.

Online (`demix`): the de-mixing is stored in output order as an `(out, k)` gather index and
coefficient table (tail groups padded with zero coefficients), so one `embedding_bag` pass
computes every output feature as a weighted sum of k features of the worker's result: no loop over
groups, no tiny matmuls. That is the fastest kernel where torch has its AVX2 path for it; on a
CPU without AVX2 (a TCG guest's baseline model, old hosts) torch's generic `embedding_bag` is
10-15x slower than gathering each group's rows, one batched k x k product and a scatter back
(`GroupedDemix`), so `demix` takes that path there. The gather table needs one contiguous row
per feature. For linear layers
the worker computes `W'' @ x^T` (same FLOPs as `x @ W''^T`) and hands back features-first memory,
so the table is its result as is, and the restored output is returned features-first too (a
transposed view, shape `(..., out)`): no transposed copy on the master. Convolution results
`(N, C, *spatial)` already hold one row per channel.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from groupcover.layer_op import apply_op
from groupcover.rng import SecretRandom
from groupcover.transport import LayerOp

DEFAULT_COND_BOUND = 100.0  # about 11% of 4x4 draws from 1..99 are redrawn
MIX_LOW, MIX_HIGH = 1, 99  # the paper's integer entries
_MAX_REDRAWS = 10_000


@dataclass(frozen=True)
class ObfuscatedLayer:
    published: torch.Tensor  # W'' (float32, same shape as the weight)
    in_perm: torch.Tensor  # pi: W''[:, c] = W'[:, pi[c]]
    groups: torch.Tensor  # (G, k) row indices, -1 pads the tail groups
    inverse: torch.Tensor  # (G, k, k) float64 inverses of the mixing, identity on the padding
    mixing: torch.Tensor  # (G, k, k) float64 mixing matrices (offline only; not kept by schemes)


def group_rows(rows: torch.Tensor, k: int) -> list[list[int]]:
    """Partition row indices into groups of at most k dissimilar rows (k a power of two).

    log2(k) rounds: visit units in descending mean cosine similarity, pair each unpaired unit
    with its least similar unpaired partner, and let the merged unit's vector be the mean of the
    two. An odd unit out stays alone, so every row lands in exactly one group and tails are
    groups smaller than k.
    """
    vectors = rows.detach().reshape(rows.shape[0], -1).to(torch.float32).numpy()
    units: list[list[int]] = [[i] for i in range(rows.shape[0])]
    for _ in range(int(math.log2(k))):
        if len(units) < 2:
            break
        units, vectors = _pair_round(units, vectors)
    return units


def _pair_round(units: list[list[int]], vectors: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    unit_vectors = F.normalize(torch.from_numpy(vectors), dim=1)
    similarity = torch.mm(unit_vectors, unit_vectors.t()).numpy()
    order = np.argsort(-similarity.mean(axis=1), kind="stable")
    taken = np.zeros(len(units), dtype=bool)
    merged: list[list[int]] = []
    merged_vectors: list[np.ndarray] = []
    for unit in order:
        if taken[unit]:
            continue
        taken[unit] = True
        candidates = np.where(taken, np.inf, similarity[unit])
        partner = int(np.argmin(candidates))
        if np.isinf(candidates[partner]):
            merged.append(units[unit])
            merged_vectors.append(vectors[unit])
            continue
        taken[partner] = True
        merged.append(units[unit] + units[partner])
        merged_vectors.append((vectors[unit] + vectors[partner]) / 2)
    return merged, np.stack(merged_vectors)


def draw_mixing(
    count: int, size: int, rng: SecretRandom, cond_bound: float = DEFAULT_COND_BOUND
) -> torch.Tensor:
    """`count` dense (size x size) integer matrices from 1..99, each with cond <= cond_bound.

    Entries are uniform (unbiased) from the secret generator; a rejected draw is redrawn whole.
    """
    mixing = torch.empty(count, size, size, dtype=torch.float64)
    todo = torch.arange(count)
    for _ in range(_MAX_REDRAWS):
        if todo.numel() == 0:
            return mixing
        draw = rng.integers(MIX_LOW, MIX_HIGH + 1, (todo.numel(), size, size)).to(torch.float64)
        mixing[todo] = draw
        cond = torch.linalg.cond(draw)
        todo = todo[~(cond <= cond_bound)]  # also redraws singular draws (cond inf or nan)
    raise ValueError(f"no {size}x{size} mixing matrix with cond <= {cond_bound} was found")


def pad_groups(groups: list[list[int]], k: int) -> torch.Tensor:
    padded = np.full((len(groups), k), -1, dtype=np.int64)
    for g, rows in enumerate(groups):
        padded[g, : len(rows)] = rows
    return torch.from_numpy(padded)


def draw_group_mixing(groups: torch.Tensor, rng: SecretRandom, cond_bound: float) -> torch.Tensor:
    """(G, k, k) mixing: a dense bounded matrix on each group's rows, identity on the padding."""
    n_groups, k = groups.shape
    sizes = (groups >= 0).sum(dim=1)
    mixing = torch.eye(k, dtype=torch.float64).repeat(n_groups, 1, 1)
    for size in sorted(set(sizes.tolist())):
        members = torch.nonzero(sizes == size).flatten()
        block = draw_mixing(members.numel(), size, rng, cond_bound)
        mixing[members, :size, :size] = block
    return mixing


def obfuscate_layer(
    weight: torch.Tensor,
    k: int,
    rng: SecretRandom,
    cond_bound: float = DEFAULT_COND_BOUND,
) -> ObfuscatedLayer:
    """Group (a public function of the weight), mix each group and permute the input features,
    both from the secret generator `rng`."""
    out_features, in_features = weight.shape[0], weight.shape[1]
    rows = weight.reshape(out_features, -1).to(torch.float64)
    groups = pad_groups(group_rows(rows, k), k)
    mixing = draw_group_mixing(groups, rng, cond_bound)
    valid = groups >= 0
    stacked = rows[groups.clamp(min=0)]  # (G, k, row)
    mixed_rows = torch.empty_like(rows)
    mixed_rows[groups[valid]] = torch.bmm(mixing, stacked)[valid]
    in_perm = rng.randperm(in_features)
    mixed = mixed_rows.reshape(weight.shape)
    published = mixed.index_select(1, in_perm).to(torch.float32).contiguous()
    inverse = torch.linalg.inv(mixing)
    return ObfuscatedLayer(published, in_perm, groups, inverse, mixing)


def restore_tables(
    groups: torch.Tensor, inverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The de-mixing in output order: (out, k) gather index and float32 coefficients.

    Row i of group g at slot r gets coef[i, j] = inverse[g, r, j] on index groups[g, j]; padding
    slots get coefficient 0 (their index points at row 0, which then adds nothing).
    """
    valid = groups >= 0
    out_features = int(valid.sum())
    k = groups.shape[1]
    per_slot_index = groups.clamp(min=0).unsqueeze(1).expand(-1, k, -1)  # (G, r, j)
    per_slot_coef = inverse * valid.unsqueeze(1)
    index = torch.empty(out_features, k, dtype=torch.long)
    coef = torch.empty(out_features, k, dtype=torch.float32)
    rows = groups[valid]
    index[rows] = per_slot_index[valid]
    coef[rows] = per_slot_coef[valid].to(torch.float32)
    return index, coef


@dataclass(frozen=True)
class GroupedDemix:
    """The de-mixing as whole groups: gather each group's k rows (`order`, padding slots read
    row 0), one batched (k x k) product with `inverse` (float32, zero on padding columns) that
    also adds the bias (`bias`, in the same group order), then each output feature's row of the
    product (`position`)."""

    order: torch.Tensor  # (G * k,) rows of the worker's result, group by group
    inverse: torch.Tensor  # (G, k, k) float32
    position: torch.Tensor  # (out,) row of the (G * k) product that is output feature i
    bias: torch.Tensor | None  # (G, k, 1) float32, zero on padding slots

    @classmethod
    def from_groups(
        cls, groups: torch.Tensor, inverse: torch.Tensor, bias: torch.Tensor | None = None
    ) -> GroupedDemix:
        valid = groups >= 0
        slots = torch.nonzero(valid.reshape(-1)).flatten()
        position = torch.empty(int(valid.sum()), dtype=torch.long)
        position[groups[valid]] = slots
        coefficients = (inverse * valid.unsqueeze(1)).to(torch.float32).contiguous()
        grouped_bias = None
        if bias is not None:
            grouped_bias = torch.zeros(groups.shape, dtype=torch.float32)
            grouped_bias[valid] = bias.to(torch.float32)[groups[valid]]
            grouped_bias = grouped_bias.unsqueeze(-1)
        order = groups.clamp(min=0).reshape(-1).contiguous()
        return cls(order, coefficients, position, grouped_bias)

    def apply_rows(self, table: torch.Tensor, *, row_major: bool = False) -> torch.Tensor:
        """(out, N) rows -> (out, N) de-mixed rows plus the bias; with `row_major` the
        (N, out) transpose instead, gathered straight from the product (one pass, where a
        gather then a transposed copy make two: ~20% of this step in a TCG guest)."""
        n_groups, k, _ = self.inverse.shape
        gathered = table.index_select(0, self.order).view(n_groups, k, -1)
        inverse = self.inverse.to(table.dtype)
        if self.bias is None:
            product = torch.bmm(inverse, gathered)
        else:
            product = torch.baddbmm(self.bias.to(table.dtype), inverse, gathered)
        product = product.view(n_groups * k, -1)
        if row_major:
            return product.t().index_select(1, self.position)
        return product.index_select(0, self.position)


def gather_kernel_is_vectorised() -> bool:
    """Whether torch runs `embedding_bag` with its AVX2 (or wider) kernels on this CPU."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "")


def demix(
    y: torch.Tensor,
    index: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    channel_dim: int,
    mask_u: torch.Tensor | None = None,
    *,
    features_first_out: bool = False,
    grouped: GroupedDemix | None = None,
) -> torch.Tensor:
    """The layer's output from the worker's result: unmask, de-mix and add the bias.

    `index`/`coef` are the `restore_tables`; `channel_dim` is -1 for linear results, 1 for
    convolutions. Linear results are gathered from features-first memory (what the worker's
    transposed op returns; a row-major result is transposed first). With `features_first_out`
    the result stays features-first (a transposed view, shape `(..., out)`), else it is made
    row-major with one blocked transpose. Convolution results (N, C, *spatial) already hold one
    row per channel. With `grouped` (the same de-mixing as `GroupedDemix`) the batched
    product replaces `embedding_bag`: same values, the faster kernel where AVX2 is missing.
    """
    if channel_dim == -1:
        return _demix_last(y, index, coef, bias, mask_u, features_first_out, grouped)
    return _demix_channels(y, index, coef, bias, mask_u, grouped)


def permute_input(x: torch.Tensor, perm: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """x with its features permuted (`x[..., perm]` on `channel_dim`), in x's own memory layout.

    A features-first input (a restored linear output, or an elementwise function of one) is
    permuted by whole contiguous rows; a row-major one by a 2-D column gather, several times
    faster than an N-D one.
    """
    if channel_dim != -1:
        return x.index_select(channel_dim, perm)
    table = features_first(x)
    if table is not None and not x.is_contiguous():
        permuted = table.index_select(0, perm)
        return permuted.t().view(x.shape)
    flat = x.reshape(-1, x.shape[-1]).index_select(1, perm)
    return flat.view(x.shape)


def features_first(y: torch.Tensor) -> torch.Tensor | None:
    """The contiguous (features, rows) table behind a features-first `(..., features)` result."""
    table = y.movedim(-1, 0)
    if y.dim() < 2 or not table.is_contiguous():
        return None
    return table.view(y.shape[-1], -1)


def _demix_last(
    y: torch.Tensor,
    index: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    mask_u: torch.Tensor | None,
    features_first_out: bool,
    grouped: GroupedDemix | None = None,
) -> torch.Tensor:
    """Linear outputs (..., out): one `embedding_bag` over the rows of the (out, N) table.

    The unmasking runs in place on the worker's result (the transport hands over a fresh
    tensor), in whatever layout y and u share; the bias is added in place to the (out, N) result.
    """
    features = y.shape[-1]
    if mask_u is not None:
        y = y.sub_(mask_u)
    table = features_first(y)
    if table is None:
        table = y.reshape(-1, features).t().contiguous()
    if grouped is not None:  # the bias included
        if not features_first_out:
            return grouped.apply_rows(table, row_major=True).view(y.shape)
        return grouped.apply_rows(table).t().view(y.shape)
    restored = F.embedding_bag(index, table, per_sample_weights=coef, mode="sum")
    if bias is not None:
        restored.add_(bias.view(-1, 1))
    if features_first_out:
        return restored.t().view(y.shape)
    out = torch.empty(restored.shape[1], restored.shape[0], dtype=restored.dtype)
    out.copy_(restored.t())  # the blocked 2-D transpose, about 4x a plain copy
    return out.view(y.shape)


def _demix_channels(
    y: torch.Tensor,
    index: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    mask_u: torch.Tensor | None,
    grouped: GroupedDemix | None = None,
) -> torch.Tensor:
    """Convolution outputs (N, C, *spatial): rows of the (N * C, spatial) view are gathered."""
    batch, channels = y.shape[0], y.shape[1]
    rows = batch * channels
    if mask_u is not None:
        y = y.sub_(mask_u)
    if grouped is not None:
        # channels first: one (C, N * spatial) table, de-mixed as rows, moved back
        table = y.reshape(batch, channels, -1).transpose(0, 1).reshape(channels, -1)
        mixed = grouped.apply_rows(table).view(channels, batch, -1).transpose(0, 1)
        return mixed.reshape(y.shape)  # the bias included
    table = y.reshape(rows, -1)
    offsets = (torch.arange(batch) * channels).view(batch, 1, 1)
    batch_index = (index + offsets).view(rows, -1)
    batch_coef = coef.expand(batch, -1, -1).reshape(rows, -1)
    restored = F.embedding_bag(batch_index, table, per_sample_weights=batch_coef, mode="sum")
    return _add_channel_bias(restored.view(y.shape), bias)


def _add_channel_bias(restored: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return restored
    shape = [1] * restored.dim()
    shape[1] = -1
    return restored.add_(bias.view(shape))


BERT_BASE_SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (768, 3072), (3072, 768))


def _clock(threads: int) -> Callable[[], float]:
    """With one torch thread all compute runs on this thread: its CPU time is robust to load."""
    return time.thread_time if threads == 1 else time.perf_counter


def _interleaved_ms(
    fns: Sequence[Callable[[], object]], repeat: int, clock: Callable[[], float]
) -> list[float]:
    """Median ms of each function, run in turn so that every one sees the same machine load."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeat):
        for fn, times in zip(fns, samples, strict=True):
            start = clock()
            fn()
            times.append((clock() - start) * 1e3)
    return [statistics.median(times) for times in samples]


def bench_deobfuscation(
    shapes: Sequence[tuple[int, int]] = BERT_BASE_SHAPES,
    batch: int = 8,
    seq: int = 128,
    repeat: int = 20,
    *,
    k: int = 4,
    threads: int = 1,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per (in, out) shape: median ms of the plain `F.linear` (with bias) and of the restore.

    `ratio` = restore / linear (de-obfuscation alone: de-mix plus bias; no mask) for a row-major
    result; `ratio_features_first` for a result left features-first (what a layer whose output
    only feeds elementwise ops and offloaded layers returns, e.g. FFN1). The worker's result is
    what the scheme's `worker_op` computes. `prepare_ms` is the input permutation (row-major
    input), reported apart. All run interleaved; with one thread the clock is this thread's CPU
    time, else wall time. Runs with `threads` torch threads
    and puts the previous setting back.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)  # the layer's data, not a secret
        rng = SecretRandom.from_seed(seed)  # a benchmark: reproducible secrets
        op = LayerOp("linear", params={"transposed": 1})  # GroupCoverScheme.worker_op
        results = []
        for in_features, out_features in shapes:
            weight = torch.randn(out_features, in_features, generator=generator)
            bias = torch.randn(out_features, generator=generator)
            x = torch.randn(batch, seq, in_features, generator=generator)
            layer = obfuscate_layer(weight, k, rng.spawn(f"{in_features}x{out_features}"))
            index, coef = restore_tables(layer.groups, layer.inverse)
            x_p = permute_input(x, layer.in_perm, -1)
            y = apply_op(op, x_p, layer.published)

            def restore(
                features_first: bool,
                y: torch.Tensor = y,
                index: torch.Tensor = index,
                coef: torch.Tensor = coef,
                bias: torch.Tensor = bias,
            ) -> torch.Tensor:
                return demix(y, index, coef, bias, -1, features_first_out=features_first)

            linear_ms, restore_ms, restore_ff_ms, prepare_ms = _interleaved_ms(
                [
                    functools.partial(F.linear, x, weight, bias),
                    functools.partial(restore, False),
                    functools.partial(restore, True),
                    functools.partial(permute_input, x, layer.in_perm, -1),
                ],
                repeat,
                _clock(threads),
            )
            results.append(
                {
                    "in_features": in_features,
                    "out_features": out_features,
                    "batch": batch,
                    "seq": seq,
                    "linear_ms": linear_ms,
                    "restore_ms": restore_ms,
                    "prepare_ms": prepare_ms,
                    "ratio": restore_ms / linear_ms,
                    "restore_features_first_ms": restore_ff_ms,
                    "ratio_features_first": restore_ff_ms / linear_ms,
                }
            )
        return results
    finally:
        torch.set_num_threads(previous)
