#!/usr/bin/env python
"""`moejax ckpt import-hf` (moejax/cli/ckpt_import_hf.py): this file keeps `python scripts/import_hf.py ...` working."""

import sys

from moejax.cli.main import run_script

if __name__ == "__main__":
    sys.exit(run_script("ckpt import-hf"))
