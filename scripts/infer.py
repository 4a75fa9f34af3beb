#!/usr/bin/env python
"""`moejax infer` (moejax/cli/infer.py): this file keeps `python scripts/infer.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("infer"))
