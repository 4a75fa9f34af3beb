#!/usr/bin/env python
"""`moejax serve` (moejax/cli/serve.py): this file keeps `python scripts/serve.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("serve"))
