#!/usr/bin/env python
"""`moejax bench model` (moejax/cli/bench/model.py): this file keeps `python scripts/bench.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("bench model"))
