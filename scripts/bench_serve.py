#!/usr/bin/env python
"""`moejax bench serve` (moejax/cli/bench/serve.py): this file keeps `python scripts/bench_serve.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench serve"))
