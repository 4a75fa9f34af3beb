#!/usr/bin/env python
"""`moejax bench compare` (moejax/cli/bench/compare.py): this file keeps `python scripts/bench_compare.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench compare"))
