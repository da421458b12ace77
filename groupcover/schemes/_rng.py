"""The schemes draw every secret through the `SecretRandom` methods.

`protect` hands every scheme a `groupcover.rng.SecretRandom`. A caller may still pass a
`torch.Generator` (tests that compare the two kinds do): `as_secret_random` wraps one in an
adapter with the same methods, which is not secret. `seeded(seed)` is the reproducible
`SecretRandom.from_seed` the evaluation uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch

from groupcover.rng import SecretRandom

Shape = int | Sequence[int] | torch.Size


class SecretRandomLike(Protocol):
    def randperm(self, n: int) -> torch.Tensor: ...
    def integers(self, low: int, high: int, shape: Shape) -> torch.Tensor: ...
    def uniform(
        self, shape: Shape, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = ...
    ) -> torch.Tensor: ...
    def normal(self, shape: Shape, dtype: torch.dtype = ...) -> torch.Tensor: ...
    def signs(self, shape: Shape, dtype: torch.dtype = ...) -> torch.Tensor: ...


def _dims(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)


class GeneratorRandom:
    """The `SecretRandom` methods over a `torch.Generator` (main's `protect`, tests): not secret."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)

    def integers(self, low: int, high: int, shape: Shape) -> torch.Tensor:
        return torch.randint(low, high, _dims(shape), generator=self.generator)

    def uniform(
        self, shape: Shape, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        unit = torch.rand(_dims(shape), generator=self.generator, dtype=torch.float64)
        return (unit * (high - low) + low).to(dtype)

    def normal(self, shape: Shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.randn(_dims(shape), generator=self.generator, dtype=torch.float64).to(dtype)

    def signs(self, shape: Shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        bits = torch.randint(0, 2, _dims(shape), generator=self.generator)
        return (bits * 2 - 1).to(dtype)


def as_secret_random(rng: Any) -> SecretRandomLike:
    if isinstance(rng, torch.Generator):
        return GeneratorRandom(rng)
    return cast(SecretRandomLike, rng)


def seeded(seed: int) -> SecretRandomLike:
    """`SecretRandom.from_seed(seed)`: reproducible, hence not secret (the evaluation's own)."""
    return cast(SecretRandomLike, SecretRandom.from_seed(seed))
