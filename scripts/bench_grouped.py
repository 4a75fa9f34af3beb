#!/usr/bin/env python
"""`moejax bench grouped` (moejax/cli/bench/grouped.py): this file keeps `python scripts/bench_grouped.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench grouped"))
