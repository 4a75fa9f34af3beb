"""Rewrite a checkpoint laid out for another mesh (and dtype), streaming, then verify it
(moejax/checkpoint/reshard.py says how).

    moejax ckpt reshard SRC DST --mesh 4x2x4x4 [--layout seed] [--dtype D] [--max-memory-gb G] [--force] [--json]

Peak memory is a few blocks whatever the model's size; --max-memory-gb bounds it (default: a quarter
of the memory free now). Only a verified DST is moved into place; an existing DST is replaced only
with --force, and never when it is, holds, is held by or links to SRC. On any failure, or a kill,
nothing is left at DST (or the old DST stays); a later run removes a killed run's temporary directory.
"""

import json


from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes, progress
from moejax.config.model import DTYPES
from moejax.parallel.mesh import parse_mesh


def run(args):
    from moejax.checkpoint.reshard import reshard

    shape = parse_mesh(args.mesh)
    rep = reshard(args.src, args.dst, shape, args.layout, args.dtype, args.max_memory_gb, args.force,
                  progress("writing tensors") if args.progress else None)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(f"resharded {args.src} -> {args.dst} for mesh {shape} ({rep['layout']}, {rep['dtype']}): "
          f"{rep['bytes_moved'] / 1e9:.3f} GB in {rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; "
          f"every tensor verified")
    if args.json:
        print(json.dumps(rep))


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--layout", help="default: the layout SRC was saved for")
    ap.add_argument("--dtype", choices=DTYPES, help="default: SRC's dtype")
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true", help="a progress line on stderr")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    return guarded(run, ap.parse_args(argv))
