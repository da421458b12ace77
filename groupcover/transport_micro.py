"""`python -m groupcover.transport_micro --serve ADDR:PORT`, as the orchestrator starts the
micro-benchmark's worker: the tool itself is `groupcover.measure.transport_micro`."""

from __future__ import annotations

import sys

from groupcover.measure.transport_micro import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
