"""Red team: the block partition of a hardened transform from a noisy estimate of it.

The transform is drawn by the scheme itself (`HardenedScheme.obfuscate` of a 384 x 384 layer:
b = 24, 16 blocks a side). From the dense transform under 50% relative noise, the attack groups
rows by output block and columns by input block (the sub-blocks of the right grouping have rank
1 or 2): the secret permutations add almost no secrecy once any rough estimate exists.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from groupcover.attacks.partition import (
    butterfly_partition,
    denoise,
    labels,
    pair_recall,
    recover_partition,
)
from groupcover.schemes import make_scheme
from groupcover.schemes._rng import seeded
from groupcover.schemes.hardened import HardenedSecret, block_size


def test_partition_of_a_hardened_transform_from_a_50_percent_noisy_estimate() -> None:
    torch.set_num_threads(1)
    n = 384
    weight = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, secret = make_scheme("hardened").obfuscate(weight, None, cast(Any, seeded(1)))
    assert isinstance(secret, HardenedSecret) and secret.inputs is not None
    transform = secret.inputs.dense()  # B: x'' = B x
    b = block_size(n, 2)
    assert b == 24
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    estimate = transform + 0.5 * transform.norm() / noise.norm() * noise
    rows, cols = recover_partition(estimate, b)
    true_rows, true_cols = butterfly_partition(secret.inputs.perms, b)
    assert pair_recall(labels(rows, n), true_rows) >= 0.9
    assert pair_recall(labels(cols, n), true_cols) >= 0.9
    # with the partition, the structure itself removes most of the estimate's noise
    cleaned = denoise(estimate, rows, cols)
    assert float((cleaned - transform).norm() / transform.norm()) < 0.3
    # a wrong grouping scores what chance gives (1 in 16 pairs)
    shuffled = labels(rows, n)[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    assert pair_recall(shuffled, true_rows) < 0.15
