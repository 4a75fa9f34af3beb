#!/usr/bin/env python
"""`moejax bench train` (moejax/cli/bench/train.py): this file keeps `python scripts/bench_train.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench train"))
