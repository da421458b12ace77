"""Red team: the block partition of a block-butterfly transform, from a noisy dense estimate.

A two-round block butterfly (the hardened scheme's `A` and `B`, `groupcover.schemes.hardened`)
is `T = P_2 D_2 M D_1 P_0`: block-diagonal stages `D_1`, `D_2` of `b x b` blocks between secret
permutations. Written as a sum over the `n` wires of the middle permutation `M`, `T = sum_w l_w
r_w^T` with `l_w` supported on the `b` rows of one output block and `r_w` on the `b` columns of
one input block. So once rows are grouped by output block and columns by input block, every
`b x b` sub-block of `T` has rank equal to the number of wires between its two blocks: 1 or 2
at the hardened scheme's sizes (`b * b / n` wires per pair), against `b` for a wrong grouping.
The permutations hide *which* rows and columns belong together, and that grouping is exactly
what the low-rank pattern gives away, to anyone holding a rough estimate of `T`.

`recover_partition(estimate, b)`:
1. rows, unsupervised: for two rows of one output block, the points `(T[i, j], T[i', j])` over
   the columns `j` of a single-wire input block all lie on one line through 0, so their angles
   collide; for rows of different blocks they spread (`angle_affinity`);
2. columns given row groups: for one output block `P`, columns of one input block have their
   `T[P, j]` in a 1-2 dimensional subspace (squared cosines near 1/2 or 1, against 1/b);
   averaged over the row groups (`group_affinity`);
3. rows given column groups the same way, transposed; rounds of 2-3 until stable.
Groups are grown greedily to the public size `b` (`grow_groups`).

`denoise(estimate, rows, cols, b)` then projects the estimate on the structure: each sub-block
truncated to the rank its singular values show (1 or 2). `pair_recall` scores a grouping: the
fraction of truly same-group pairs put in the same group.

Measured (tests/unit/test_attack_partition.py, a transform drawn by the scheme's own code, n =
384, b = 24, 50% relative Frobenius noise): >= 90% of same-group pairs, rows and columns.
"""

from __future__ import annotations

import math

import torch

ANGLE_BINS = 48


def angle_affinity(t: torch.Tensor, bins: int = ANGLE_BINS) -> torch.Tensor:
    """(n, n) row affinity: how much the points (t[i, j], t[i', j]) over j collide in angle
    (energy-weighted collision rate of `bins` angle bins over [0, pi))."""
    n = t.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    energy = t * t
    for i in range(n):
        theta = torch.atan2(t, t[i].expand_as(t)) % math.pi  # (n rows i', cols)
        index = (theta / math.pi * bins).long().clamp(max=bins - 1)
        weight = energy + energy[i]
        hist = torch.zeros(n, bins, dtype=torch.float64).scatter_add_(1, index, weight)
        out[i] = (hist * hist).sum(1) / weight.sum(1).pow(2)
    out = (out + out.t()) / 2
    out.fill_diagonal_(0.0)
    return out


def group_affinity(t: torch.Tensor, row_groups: list[list[int]]) -> torch.Tensor:
    """(cols, cols) column affinity given row groups: the mean over groups P of the squared
    cosine between t[P, j] and t[P, j']."""
    cols = t.shape[1]
    out = torch.zeros(cols, cols, dtype=torch.float64)
    for group in row_groups:
        unit = torch.nn.functional.normalize(t[group], dim=0)
        out += (unit.t() @ unit).pow(2)
    out /= max(len(row_groups), 1)
    out.fill_diagonal_(0.0)
    return out


def grow_groups(affinity: torch.Tensor, size: int) -> list[list[int]]:
    """Groups of `size` items: each seeded by the free item with the strongest `size - 1`
    nearest affinities, grown by the free item most tied to the group so far."""
    n = affinity.shape[0]
    free = torch.ones(n, dtype=torch.bool)
    groups = []
    while bool(free.any()):
        sub = affinity[free][:, free]
        count = min(size, int(free.sum()))
        strength = sub.topk(max(count - 1, 1), dim=1).values.sum(1) if count > 1 else sub[:, 0]
        ids = free.nonzero().flatten()
        group = [int(ids[int(strength.argmax())])]
        free[group[0]] = False
        tie = affinity[group[0]].clone()
        while len(group) < count:
            candidates = torch.where(free, tie, torch.full_like(tie, -math.inf))
            pick = int(candidates.argmax())
            group.append(pick)
            free[pick] = False
            tie += affinity[pick]
        groups.append(sorted(group))
    return groups


def recover_partition(
    estimate: torch.Tensor, b: int, rounds: int = 3
) -> tuple[list[list[int]], list[list[int]]]:
    """(row groups, column groups) of a block butterfly from a noisy dense estimate of it."""
    t = estimate.to(torch.float64)
    rows = grow_groups(angle_affinity(t), b)
    cols = grow_groups(group_affinity(t, rows), b)
    for _ in range(rounds):
        rows = grow_groups(group_affinity(t.t(), cols), b)
        cols = grow_groups(group_affinity(t, rows), b)
    return rows, cols


def labels(groups: list[list[int]], n: int) -> torch.Tensor:
    out = torch.full((n,), -1, dtype=torch.long)
    for g, members in enumerate(groups):
        out[members] = g
    return out


def pair_recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of pairs in one true group that `found` puts in one group too."""
    same_true = truth.unsqueeze(0) == truth.unsqueeze(1)
    same_found = found.unsqueeze(0) == found.unsqueeze(1)
    off = ~torch.eye(truth.numel(), dtype=torch.bool)
    return float((same_true & same_found & off).sum() / (same_true & off).sum())


def butterfly_partition(
    perms: tuple[torch.Tensor, ...], b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The true (row, column) block labels of a butterfly with these permutations (scoring)."""
    rows = perms[-1] // b  # output i is stage-2 position perms[-1][i]
    cols = torch.argsort(perms[0]) // b  # input j sits at stage-1 position argsort(perms[0])[j]
    return rows, cols


def denoise(
    estimate: torch.Tensor, rows: list[list[int]], cols: list[list[int]], max_rank: int = 2
) -> torch.Tensor:
    """The estimate projected on the butterfly's structure: every (row group, column group)
    sub-block truncated to the rank its singular values show (at most `max_rank`; a second
    singular value is kept when it stands out of the noise bulk of the sub-block)."""
    t = estimate.to(torch.float64)
    out = torch.zeros_like(t)
    blocks = [(r, c) for r in rows for c in cols]
    noise = []
    svds = []
    for r, c in blocks:
        u, s, vh = torch.linalg.svd(t[r][:, c], full_matrices=False)
        svds.append((u, s, vh))
        noise.append(s[max_rank:].pow(2).mean())
    bulk = float(torch.stack(noise).mean().sqrt()) * 2.0  # the noise's top singular value
    for (r, c), (u, s, vh) in zip(blocks, svds, strict=True):
        keep = max(1, min(max_rank, int((s > bulk).sum())))
        part = (u[:, :keep] * s[:keep]) @ vh[:keep]
        out[torch.tensor(r).unsqueeze(1), torch.tensor(c)] = part
    return out
