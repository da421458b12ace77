"""gcvm's hardened scheme: two-sided, secret, structured-dense real transforms.

Published: `W'' = A^-1 W B^-1`, where the master keeps `B` (applied to every input before it
leaves, `x'' = B x`) and `A` (applied to every result, `y = A y'' + b`), so `A W'' B = W`.
Each of `A` (out x out) and `B` (in x in) is a *block butterfly*: `rounds` stages, each a secret
permutation of the features followed by a block-diagonal matrix of secret dense real `b x b`
blocks, and a last secret permutation. The first and last permutations are uniform; the ones
between stages are secret but balanced (every block deals its outputs over all next blocks), so
with `b*b >= n` two rounds make every output feature depend on every input feature. Each block
is `Q1 diag(s) Q2^T` with Haar orthogonal `Q1, Q2` and singular values `s` log-uniform in
`[1/sqrt(c), sqrt(c)]`: its condition
number is at most `c`, so a transform of `rounds` stages has cond <= c**rounds (float32 exact),
and it is not orthogonal (Gram matrices and singular values are not preserved).

Why (DESIGN.md, "Hardened scheme"): GroupCover mixes rows inside small groups and permutes
columns, which leaves every group's row space, the grouping itself (a public function of the
weights), the integrality of the entries and, for layers with fewer rows than columns, the row
space of the whole matrix; the attacks in `groupcover.attacks` use each of these. Here no set of
published rows spans a space tied to a few public rows (the left transform is dense), no set of
published columns is a permutation of public columns (the right transform is dense too, which
hides the row space of short-wide layers), entries are real, and nothing is a public function of
the weights: everything is drawn from the `SecretRandom`.

Cost in the master per token: `2 * rounds * n * b` multiply-adds per side (b ~ sqrt(n)) plus
`rounds + 1` gathers, against `out * in` for the layer itself. Linear and convolution layers
(the transforms act on channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from groupcover.layer_op import LayerOp
from groupcover.schemes._rng import SecretRandomLike, as_secret_random
from groupcover.schemes.base import LayerSecret, Scheme


def block_size(n: int, rounds: int) -> int:
    """The smallest divisor b of n with b**rounds >= n (n itself for a prime n)."""
    need = math.ceil(n ** (1.0 / rounds) - 1e-9)
    for b in range(max(1, need), n + 1):
        if n % b == 0:
            return b
    return n


# scratch tables by (features, columns, dtype), shared by every transform of this process (the
# master runs one layer at a time; nothing in them outlives a call)
_SCRATCH: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class Butterfly:
    """x -> stages: for each (perm, blocks): x = blockdiag(blocks) @ x[perm]; then x[last]."""

    perms: tuple[torch.Tensor, ...]  # rounds + 1 permutations (int64)
    blocks: tuple[torch.Tensor, ...]  # rounds tensors (n/b, b, b), float64
    blocks32: tuple[torch.Tensor, ...] = ()  # the same in float32 (what float32 tables use)

    @property
    def size(self) -> int:
        return int(self.perms[0].numel())

    def apply_table(self, table: torch.Tensor) -> torch.Tensor:
        """The transform of every column of a (n, N) features-first table: a new (n, N) table.

        The stages ping-pong between two scratch buffers kept per table shape (large fresh
        allocations cost page faults on every call); the result is a fresh tensor.
        """
        n, count = table.shape
        gathered, product = self._scratch(n, count, table.dtype)
        for perm, blocks in zip(self.perms, self.in_dtype(table.dtype), strict=False):
            torch.index_select(table, 0, perm, out=gathered)
            groups, b, _ = blocks.shape
            torch.bmm(blocks, gathered.view(groups, b, count), out=product.view(groups, b, count))
            table = product
        return table.index_select(0, self.perms[-1])

    def _scratch(self, n: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, count, dtype)
        buffers = _SCRATCH.get(key)
        if buffers is None:
            if len(_SCRATCH) > 16:
                _SCRATCH.clear()
            buffers = (torch.empty(n, count, dtype=dtype), torch.empty(n, count, dtype=dtype))
            _SCRATCH[key] = buffers
        return buffers

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if dtype == torch.float64:
            return self.blocks
        if dtype == torch.float32 and self.blocks32:
            return self.blocks32
        return tuple(b.to(dtype) for b in self.blocks)

    def dense(self) -> torch.Tensor:
        return self.apply_table(torch.eye(self.size, dtype=torch.float64))

    # A butterfly's inverse is another butterfly (inverse blocks, inverse permutations, reverse
    # order) and its inverse-transpose has the forward structure with the blocks'
    # inverse-transposes: `obfuscate` costs a few block products per side instead of dense
    # solves (about 34 GFLOP for a 3072-wide side in float64).

    def inverse_transpose_apply(self, table: torch.Tensor) -> torch.Tensor:
        """B^-T table (float64): the forward structure, every block its inverse-transpose."""
        for perm, blocks in zip(self.perms, self.blocks, strict=False):
            table = _block_product(table.index_select(0, perm),
                                   torch.linalg.inv(blocks).transpose(-2, -1))  # fmt: skip
        return table.index_select(0, self.perms[-1])

    def inverse_apply(self, table: torch.Tensor) -> torch.Tensor:
        """A^-1 table (float64): undo the last permutation, then each stage in reverse."""
        table = table.index_select(0, torch.argsort(self.perms[-1]))
        for perm, blocks in zip(reversed(self.perms[:-1]), reversed(self.blocks), strict=True):
            table = _block_product(table, torch.linalg.inv(blocks))
            table = table.index_select(0, torch.argsort(perm))
        return table

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        named = {f"{prefix} permutation {i}": p for i, p in enumerate(self.perms)}
        named.update({f"{prefix} blocks {i}": b for i, b in enumerate(self.blocks)})
        return named


def _block_product(table: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ table, for an (n, count) table and (n/b, b, b) blocks."""
    n, count = table.shape
    groups, b, _ = blocks.shape
    return torch.bmm(blocks, table.reshape(groups, b, count)).view(n, count)


def _haar(rng: SecretRandomLike, count: int, b: int) -> torch.Tensor:
    gauss = rng.normal((count, b, b))
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def balanced_perm(rng: SecretRandomLike, n: int, b: int) -> torch.Tensor:
    """A secret permutation between two block stages that deals every block's outputs evenly
    over the next stage's blocks (each next block reads from min(b, n/b) blocks): shuffled
    inside every block, interleaved, blocks relabelled at random."""
    groups = n // b
    inside = torch.stack([rng.randperm(b) for _ in range(groups)])  # (G, b)
    index = inside + (torch.arange(groups) * b).unsqueeze(1)
    dealt = index.t().reshape(groups, b)  # position-major: consecutive b cycle through blocks
    return dealt[rng.randperm(groups)].reshape(-1)


def draw_butterfly(
    rng: SecretRandomLike, n: int, rounds: int, cond: float, b: int | None = None
) -> Butterfly:
    b = b or block_size(n, rounds)
    groups = n // b
    middle = [balanced_perm(rng, n, b) for _ in range(rounds - 1)]
    perms = (rng.randperm(n), *middle, rng.randperm(n))
    blocks = []
    half = 0.5 * math.log(cond)
    for _ in range(rounds):
        left, right = _haar(rng, groups, b), _haar(rng, groups, b)
        singular = rng.uniform((groups, b), -half, half).exp()
        blocks.append((left * singular.unsqueeze(-2)) @ right.transpose(-2, -1))
    kept = tuple(b.contiguous() for b in blocks)
    return Butterfly(perms, kept, tuple(b.to(torch.float32) for b in kept))


@dataclass(frozen=True, eq=False)
class HardenedSecret(LayerSecret):
    inputs: Butterfly | None = None  # B: x'' = B x
    outputs: Butterfly | None = None  # A: y = A y'' + b
    master_dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        named = super().tensors()
        if self.inputs is not None:
            named.update(self.inputs.tensors("input transform"))
        if self.outputs is not None:
            named.update(self.outputs.tensors("output transform"))
        return named


class HardenedScheme(Scheme):
    """Two-sided secret block-butterfly transforms (see the module docstring)."""

    name = "hardened"
    source = "gcvm hardened scheme: two-sided secret structured-dense real transforms"
    takes_k = False

    def __init__(
        self, rounds: int = 2, cond: float = 4.0, sides: str = "both", block: int | None = None
    ) -> None:
        if sides not in ("both", "out", "in"):
            raise ValueError("sides is both, out or in")
        self.rounds = rounds
        self.cond = cond
        self.sides = sides
        self.block = block  # None: the smallest b with b**rounds >= n (dense after the rounds)

    def _block(self, n: int) -> int | None:
        if self.block is None or n % self.block:
            return None
        return self.block

    def worker_op(self, op: LayerOp) -> LayerOp:
        """Features-first results: the output transform works on whole feature rows."""
        if op.kind != "linear":
            return op
        return LayerOp(op.kind, op.stride, op.padding, op.dilation, {**op.params, "transposed": 1})

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        """Linear (out, in) or convolution (out, in, *kernel): the transforms act on channels."""
        rng = as_secret_random(generator)
        out_features, in_features = weight.shape[0], weight.shape[1]
        w = weight.detach().to(torch.float64)
        inputs = outputs = None
        if self.sides in ("both", "in"):
            inputs = draw_butterfly(
                rng, in_features, self.rounds, self.cond, self._block(in_features)
            )
            last = w.movedim(1, -1)  # (out, *kernel, in): W B^-1 at every kernel position
            rows = last.reshape(-1, in_features).t().contiguous()  # (W B^-1)^T = B^-T W^T
            w = inputs.inverse_transpose_apply(rows).t().reshape(last.shape).movedim(-1, 1)
        if self.sides in ("both", "out"):
            outputs = draw_butterfly(
                rng, out_features, self.rounds, self.cond, self._block(out_features)
            )
            rows = outputs.inverse_apply(w.reshape(out_features, -1).contiguous())
            w = rows.reshape(w.shape)  # A^-1 W B^-1
        kept = None if bias is None else bias.detach().to(torch.float32).clone()
        dim = -1 if weight.dim() == 2 else 1
        secret = HardenedSecret(
            dim, out_features, bias=kept, inputs=inputs, outputs=outputs, master_dtype=weight.dtype
        )
        return w.to(weight.dtype).contiguous(), secret

    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        assert isinstance(secret, HardenedSecret)
        if secret.inputs is None:
            return x
        dim = secret.channel_dim % x.dim()
        table = secret.inputs.apply_table(_table(x, dim))
        return _untable(table, x, dim)

    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        assert isinstance(secret, HardenedSecret)
        if mask_u is not None:
            y = y.sub_(mask_u)
        dim = secret.channel_dim % y.dim()
        table = _table(y, dim)
        if table.dtype != secret.master_dtype:  # a float64 (masked) result: unmasked, now exact
            table = table.to(secret.master_dtype)
        if secret.outputs is not None:
            table = secret.outputs.apply_table(table)
        elif not table.is_contiguous():
            table = table.contiguous()
        if secret.bias is not None:
            table = table.add_(secret.bias.to(table.dtype).view(-1, 1))
        if features_first and dim == y.dim() - 1:
            return table.t().view(y.shape)
        return _untable(table, y, dim, row_major=True)


def _table(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The (channels, rest) table of x: a view when x is channels-first in memory, else a copy."""
    channels = x.shape[dim]
    moved = x.movedim(dim, 0)
    if moved.is_contiguous():
        return moved.view(channels, -1)
    return moved.reshape(channels, -1).contiguous()


def _untable(
    table: torch.Tensor, like: torch.Tensor, dim: int, row_major: bool = False
) -> torch.Tensor:
    """A (channels, rest) table back in `like`'s shape (a channels-first view unless row_major)."""
    moved_shape = (like.shape[dim], *(s for i, s in enumerate(like.shape) if i != dim))
    if dim == like.dim() - 1 and not row_major:
        return table.t().view(like.shape)
    if dim == like.dim() - 1:
        out = torch.empty(table.shape[1], table.shape[0], dtype=table.dtype)
        out.copy_(table.t())  # the blocked 2-D transpose
        return out.view(like.shape)
    return table.view(moved_shape).movedim(0, dim).contiguous()
