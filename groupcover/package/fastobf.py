"""The hardened scheme's offline step for `protect`, with the butterflies' structure.

`HardenedScheme.obfuscate` forms each transform densely and solves `A^-1 W B^-1` with two LU
factorisations (about 34 GFLOP for a 3072-wide side in float64: most of a BERT-base protect).
A butterfly's inverse is another butterfly (inverse blocks, inverse permutations, reverse
order), and its inverse-transpose has the forward structure with the blocks' inverse-transposes,
so the same published weight costs a few block products per side. Secrets are drawn in exactly
the scheme's order from the same generator, so `protect` and the scheme publish the same values
(to float64 rounding: tested).
"""

from __future__ import annotations

from typing import Any

import torch

from groupcover.scheme import LayerSecret, Scheme
from groupcover.schemes._rng import as_secret_random
from groupcover.schemes.hardened import Butterfly, HardenedScheme, HardenedSecret, draw_butterfly


def _gather_blocks(table: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    n, count = table.shape
    groups, b, _ = blocks.shape
    gathered = table.index_select(0, perm)
    return torch.bmm(blocks, gathered.view(groups, b, count)).view(n, count)


def inverse_transpose_apply(bf: Butterfly, table: torch.Tensor) -> torch.Tensor:
    """B^-T table: the forward structure with every block replaced by its inverse-transpose."""
    for perm, blocks in zip(bf.perms, bf.blocks, strict=False):
        table = _gather_blocks(table, perm, torch.linalg.inv(blocks).transpose(-2, -1))
    return table.index_select(0, bf.perms[-1])


def inverse_apply(bf: Butterfly, table: torch.Tensor) -> torch.Tensor:
    """A^-1 table: undo the last permutation, then each stage in reverse."""
    table = table.index_select(0, torch.argsort(bf.perms[-1]))
    for perm, blocks in zip(reversed(bf.perms[:-1]), reversed(bf.blocks), strict=True):
        n, count = table.shape
        groups, b, _ = blocks.shape
        solved = torch.bmm(torch.linalg.inv(blocks), table.reshape(groups, b, count))
        table = solved.view(n, count).index_select(0, torch.argsort(perm))
    return table


def hardened_obfuscate(
    scheme: HardenedScheme, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
) -> tuple[torch.Tensor, LayerSecret]:
    """What `scheme.obfuscate` returns, computed through the butterflies' structure."""
    rng = as_secret_random(generator)
    out_features, in_features = weight.shape[0], weight.shape[1]
    w = weight.detach().to(torch.float64)
    inputs = outputs = None
    if scheme.sides in ("both", "in"):
        inputs = draw_butterfly(rng, in_features, scheme.rounds, scheme.cond,
                                scheme._block(in_features))  # fmt: skip
        last = w.movedim(1, -1)  # (out, *kernel, in): W B^-1 at every kernel position
        rows = last.reshape(-1, in_features)
        w = inverse_transpose_apply(inputs, rows.t().contiguous()).t().reshape(last.shape)
        w = w.movedim(-1, 1)
    if scheme.sides in ("both", "out"):
        outputs = draw_butterfly(rng, out_features, scheme.rounds, scheme.cond,
                                 scheme._block(out_features))  # fmt: skip
        w = inverse_apply(outputs, w.reshape(out_features, -1).contiguous()).reshape(w.shape)
    kept = None if bias is None else bias.detach().to(torch.float32).clone()
    dim = -1 if weight.dim() == 2 else 1
    secret = HardenedSecret(dim, out_features, bias=kept, inputs=inputs, outputs=outputs,
                            master_dtype=weight.dtype)  # fmt: skip
    return w.to(weight.dtype).contiguous(), secret


def obfuscate(scheme: Scheme, weight: torch.Tensor, bias: torch.Tensor | None,
              generator: Any) -> tuple[torch.Tensor, LayerSecret]:  # fmt: skip
    if isinstance(scheme, HardenedScheme):
        return hardened_obfuscate(scheme, weight, bias, generator)
    return scheme.obfuscate(weight, bias, generator)
