#!/usr/bin/env python
"""Export a moejax checkpoint as a Hugging Face Mixtral checkpoint (config.json + safetensors).

    python scripts/export_hf.py CKPT OUT [--max-shard-gb 5] [--force]
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, peak_rss_bytes, progress  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def run(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"{args.out!r} exists and is not a directory: give a new path or a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise UserError(f"{args.out!r} exists and is not empty: pass --force to overwrite its files")
    if not args.max_shard_gb > 0:
        raise UserError(f"--max-shard-gb {args.max_shard_gb} must be > 0")
    from moejax import checkpoint, hf
    from moejax.mesh import MeshShape, make_mesh
    from moejax.rules import load_layout

    t0 = time.perf_counter()
    mesh = make_mesh(MeshShape(1, 1, 1, 1))
    checkpoint.refuse_quantized(checkpoint.read_meta(args.ckpt)[0], args.ckpt, "export_hf.py")
    cfg, params, meta = checkpoint.restore(args.ckpt, mesh, load_layout("seed"))
    files = hf.write_hf(args.out, cfg, params, int(args.max_shard_gb * 2**30), progress("writing tensors"))
    rep = {"out": args.out, "files": files, "params_total": cfg.param_count(), "dtype": meta["dtype"],
           "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
    print(f"exported {cfg.param_count():,} parameters to {args.out} ({len(files)} file(s)) in {rep['seconds']:.1f} s, "
          f"peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    sys.exit(guarded(run, ap.parse_args()))
