#!/usr/bin/env python
"""`moejax eval` (moejax/cli/eval.py): this file keeps `python scripts/eval.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("eval"))
