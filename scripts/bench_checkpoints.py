#!/usr/bin/env python
"""`moejax bench checkpoints` (moejax/cli/bench/checkpoints.py): this file keeps `python scripts/bench_checkpoints.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench checkpoints"))
