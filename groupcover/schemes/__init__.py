"""Obfuscation schemes beyond the identity and GroupCover of `groupcover.scheme` (issue 9).

`baselines`: published schemes the security evaluation attacks (plain permutation, ShadowNet-,
SOTER- and NNSplitter-style, GroupCover as published); `hardened`: gcvm's two-sided
structured-dense scheme. All are registered in `groupcover.scheme.SCHEMES` through
`groupcover.schemes.catalog` and reached with `groupcover.scheme.make_scheme(name, k)`.
"""

# groupcover.scheme registers this package's schemes at its end: load it first, whichever
# module of this package is imported first.
import groupcover.scheme  # noqa: F401
