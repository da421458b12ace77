"""The scan's constants, numpy on first use, and its input error."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError

STRIDE = 16  # the file is sampled every STRIDE bytes
WINDOW = 8  # bytes per fingerprint (one uint64)
MIN_MATCH = 64  # contiguous bytes of one vector that make a hit
MIN_DISTINCT = 4  # distinct byte values a fingerprint needs
DEFAULT_SKIP = re.compile(r"embedding", re.IGNORECASE)
DTYPES = ("float32", "float16", "bfloat16")

if TYPE_CHECKING:
    import numpy as np
else:

    class _Numpy:  # numpy on first use: `gcvm` imports this module at every start
        def __getattr__(self, name: str) -> Any:
            import numpy

            return getattr(numpy, name)

    np = _Numpy()


class ScanInputError(UsageError):
    """A bad --model or --paths: one line, exit 2."""
