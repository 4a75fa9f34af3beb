#!/usr/bin/env python
"""`moejax ckpt quantize` (moejax/cli/ckpt_quantize.py): this file keeps `python scripts/quantize.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("ckpt quantize"))
