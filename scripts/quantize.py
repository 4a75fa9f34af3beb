#!/usr/bin/env python
"""Quantize a moejax checkpoint's attention and expert matrices to int8 (moejax/quant.py).

    python scripts/quantize.py CKPT OUT [--scheme int8] [--json]

Per output channel: int8 values and a float32 scale (max |w| / 127); embeddings, norms, the router
and the head keep CKPT's dtype. OUT restores onto any mesh like any checkpoint (its metadata says
`quant: int8`) and infer.py, bench.py and serve.py take it as it is. OUT is written to a temporary
directory, read back (every tensor checked against the checksums saved with it) and only then moved
into place; an existing OUT is never touched.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, limit_malloc_arenas, peak_rss_bytes  # noqa: E402
from moejax.config import QUANT_SCHEMES  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def run(args) -> dict:
    src, out = os.path.abspath(args.ckpt), os.path.abspath(args.out)
    if os.path.exists(out):
        raise UserError(f"{args.out!r} exists: give a new directory (nothing is overwritten)")
    from moejax import checkpoint
    from moejax.mesh import MeshShape, make_mesh
    from moejax.quant import quantize
    from moejax.rules import load_layout

    meta, _ = checkpoint.read_meta(src)
    if checkpoint.quant_of(meta):
        raise UserError(f"checkpoint {args.ckpt!r} is already {checkpoint.quant_of(meta)}-quantized")
    t0 = time.perf_counter()
    mesh = make_mesh(MeshShape(1, 1, 1, 1))
    layout = load_layout(meta["layout"])
    cfg, params, _ = checkpoint.restore(src, mesh, layout)
    before = sum(a.size * a.dtype.itemsize for a in params.values())
    params = quantize(params, args.scheme)
    after = sum(a.size * a.dtype.itemsize for a in params.values())
    tmp = out + f".tmp-{os.getpid()}"
    try:
        checkpoint.save(tmp, params, cfg, layout, meta["dtype"], "1x1x1x1", step=0)
        del params
        checkpoint.restore(tmp, mesh, layout)  # every tensor read back against its saved checksum
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep = {"ckpt": args.ckpt, "out": args.out, "scheme": args.scheme, "bytes_before": before, "bytes_after": after,
           "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
    print(f"quantized {args.ckpt} -> {args.out} ({args.scheme}): {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    if args.json:
        print(json.dumps(rep))
    return rep


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--scheme", default="int8", choices=QUANT_SCHEMES)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    limit_malloc_arenas()
    sys.exit(guarded(run, args))
