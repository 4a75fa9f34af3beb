#!/usr/bin/env python
"""`moejax ckpt reshard` (moejax/cli/ckpt_reshard.py): this file keeps `python scripts/reshard.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("ckpt reshard"))
