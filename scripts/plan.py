#!/usr/bin/env python
"""`moejax plan` (moejax/cli/plan.py): this file keeps `python scripts/plan.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("plan"))
