#!/usr/bin/env python
"""`moejax ckpt make` (moejax/cli/ckpt_make.py): this file keeps `python scripts/make_checkpoint.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("ckpt make"))
