#!/usr/bin/env python
"""`moejax train` (moejax/cli/train.py): this file keeps `python scripts/train.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("train"))
