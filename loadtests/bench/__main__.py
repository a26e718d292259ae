"""``python -m loadtests.bench``: the goodput sweep (loadtests/bench/sweep.py)."""

import sys

from .sweep import main

if __name__ == "__main__":
    sys.exit(main())
