#!/usr/bin/env python
"""`moejax bench serve-hf` (moejax/cli/bench/serve_hf.py): this file keeps `python scripts/bench_serve_hf.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench serve-hf"))
