"""``python3 -m benchmarks [--full] [--tiers ...] [--out DIR]``: the benchmark suite."""

from __future__ import annotations

import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
