"""Obfuscation schemes and their registry.

`base`: the `Scheme` interface, `LayerSecret` and the registry `SCHEMES` (a subclass that sets
`name` registers itself); `core`: identity and GroupCover, the schemes of the benchmark's modes;
`baselines`: published schemes the security evaluation attacks (plain permutation, ShadowNet-,
SOTER- and NNSplitter-style, GroupCover as published); `hardened`: gcvm's two-sided
structured-dense scheme. Importing this package imports them all, so `SCHEMES` is complete;
`make_scheme(name, k)` builds one by name.
"""

from __future__ import annotations

# The modules that define schemes, in registry order (their classes register as they are defined).
from groupcover.errors import UsageError
from groupcover.schemes import baselines, core, hardened
from groupcover.schemes.base import SCHEMES, LayerSecret, Scheme, channel_dim_of, op_for
from groupcover.schemes.baselines import (
    NNSplitterScheme,
    PaperGroupCoverScheme,
    PermutationScheme,
    ShadowNetScheme,
    SoterScheme,
)
from groupcover.schemes.core import GroupCoverScheme, IdentityScheme
from groupcover.schemes.hardened import HardenedScheme

__all__ = [
    "SCHEMES",
    "GroupCoverScheme",
    "HardenedScheme",
    "IdentityScheme",
    "LayerSecret",
    "NNSplitterScheme",
    "PaperGroupCoverScheme",
    "PermutationScheme",
    "Scheme",
    "ShadowNetScheme",
    "SoterScheme",
    "baselines",
    "channel_dim_of",
    "core",
    "hardened",
    "make_scheme",
    "op_for",
]


def make_scheme(name: str, k: int = 4) -> Scheme:
    """A scheme by its registered name; `k` goes to schemes that group rows."""
    cls = SCHEMES.get(name)
    if cls is None:
        raise UsageError(f"unknown scheme {name!r}", hint=f"choose one of {', '.join(SCHEMES)}")
    if cls.takes_k:
        return cls(k=k)  # type: ignore[call-arg]
    return cls()
