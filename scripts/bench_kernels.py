#!/usr/bin/env python
"""`moejax bench kernels` (moejax/cli/bench/kernels.py): this file keeps `python scripts/bench_kernels.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench kernels"))
