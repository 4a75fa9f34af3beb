#!/usr/bin/env python
"""`moejax plot-train` (moejax/cli/plot_train.py): this file keeps `python scripts/plot_train.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("plot-train"))
