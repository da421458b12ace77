"""`python -m groupcover.keyrelease --broker URL --tee snp|tdx|none [--resource R] [--out FILE]`:
the `keyrelease` verb (groupcover.keyrelease.cli), as guests run it."""

import sys

from groupcover.keyrelease.cli import main

if __name__ == "__main__":
    sys.exit(main())
