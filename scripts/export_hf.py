#!/usr/bin/env python
"""`moejax ckpt export-hf` (moejax/cli/ckpt_export_hf.py): this file keeps `python scripts/export_hf.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("ckpt export-hf"))
