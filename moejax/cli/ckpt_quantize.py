"""Quantize a moejax checkpoint's attention and expert matrices to int8 (moejax/ops/quant.py).

    moejax ckpt quantize CKPT OUT [--scheme int8] [--json]

Per output channel: int8 values and a float32 scale (max |w| / 127); embeddings, norms, the router
and the head keep CKPT's dtype. OUT restores onto any mesh like any checkpoint (its metadata says
`quant: int8`) and infer.py, bench.py and serve.py take it as it is. OUT is written to a temporary
directory, read back (every tensor checked against the checksums saved with it) and only then moved
into place; an existing OUT is never touched.
"""

import json


from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes
from moejax.config.model import QUANT_SCHEMES


def run(args) -> dict:
    from moejax.checkpoint.quantize import quantize

    rep = quantize(args.ckpt, args.out, args.scheme)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(f"quantized {args.ckpt} -> {args.out} ({args.scheme}): {rep['bytes_before'] / 1e6:.1f} MB -> "
          f"{rep['bytes_after'] / 1e6:.1f} MB in {rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; "
          f"every tensor verified")
    if args.json:
        print(json.dumps(rep))
    return rep


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--scheme", default="int8", choices=QUANT_SCHEMES)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return guarded(run, args)
