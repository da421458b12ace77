"""The schemes of this package by name, for `groupcover.scheme.SCHEMES`."""

from __future__ import annotations

from groupcover.scheme import Scheme
from groupcover.schemes.baselines import (
    NNSplitterScheme,
    PaperGroupCoverScheme,
    PermutationScheme,
    ShadowNetScheme,
    SoterScheme,
)
from groupcover.schemes.hardened import HardenedScheme

_CLASSES: tuple[type[Scheme], ...] = (
    PermutationScheme,
    ShadowNetScheme,
    SoterScheme,
    NNSplitterScheme,
    PaperGroupCoverScheme,
    HardenedScheme,
)
EXTRA_SCHEMES: dict[str, type[Scheme]] = {str(cls.name): cls for cls in _CLASSES}
