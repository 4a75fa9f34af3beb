#!/usr/bin/env python
"""`moejax bench moe` (moejax/cli/bench/moe.py): this file keeps `python scripts/bench_moe.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench moe"))
