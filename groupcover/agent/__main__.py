"""`python -m groupcover.agent`: the locked master's job agent (the measured image's unit runs
it when the kernel command line says `gcvm.locked=1`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from groupcover.agent.jobs import PACKAGES_ROOT, RESULTS_ROOT
from groupcover.agent.server import PORT, Agent, make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupcover.agent", description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--packages", type=Path, default=Path(PACKAGES_ROOT))
    parser.add_argument("--results", type=Path, default=Path(RESULTS_ROOT))
    args = parser.parse_args(argv)
    server = make_server(Agent(args.packages, args.results), args.listen, args.port)
    print(f"gcvm-agent: listening on {args.listen}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 130
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
