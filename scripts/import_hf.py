#!/usr/bin/env python
"""Import a Hugging Face Mixtral checkpoint (config.json + safetensors) as a moejax checkpoint.

    python scripts/import_hf.py HF_DIR OUT [--dtype bfloat16] [--force]

Reads tensor by tensor (peak memory ~ one copy of the model) and refuses, naming the field, what
moejax does not implement (sliding window, tied embeddings, biases, RoPE scaling, ...). The written
step is read back from disk and checked against the checksums saved with it; if that fails, the
step (and OUT, if this run created it) is removed.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, peak_rss_bytes, progress  # noqa: E402
from moejax.config import DTYPES  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def check_out(out: str, force: bool, what: str) -> None:
    """OUT must be a new path, an empty directory, or (with --force) an existing directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out!r} exists and is not a directory: give a new path or a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"{out!r} exists and is not empty: pass --force to {what}")


def run(args):
    check_out(args.out, args.force, "add a new step to it")
    from moejax import checkpoint, hf
    from moejax.mesh import MeshShape, make_mesh
    from moejax.rules import load_layout

    t0 = time.perf_counter()
    cfg, params = hf.read_hf(args.hf_dir, progress("reading tensors"))
    dtype = args.dtype or cfg.param_dtype
    if dtype != cfg.param_dtype:
        params = {n: a.astype(hf._np_dtype(dtype)) for n, a in params.items()}
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    created = not os.path.exists(args.out)
    step = checkpoint.save(args.out, params, cfg, load_layout("seed"), dtype, "1x1x1x1")
    del params
    try:  # read back what was written: restore checks every tensor against its saved checksum
        checkpoint.restore(args.out, make_mesh(MeshShape(1, 1, 1, 1)), load_layout("seed"), step=step)
    except UserError:
        shutil.rmtree(args.out if created else os.path.join(args.out, str(step)), ignore_errors=True)
        raise
    rep = {"out": args.out, "step": step, "config": cfg.name, "params_total": cfg.param_count(), "dtype": dtype,
           "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
    print(f"imported {cfg.param_count():,} parameters ({dtype}) into {args.out} step {step} in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    sys.exit(guarded(run, ap.parse_args()))
