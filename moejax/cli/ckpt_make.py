"""Write a random-weight checkpoint of any config without holding it in memory (for tests and
benchmarks; moejax/checkpoint/make.py says how the weights are drawn).

    moejax ckpt make --config C --out DIR [--format moejax|hf] [--dtype D] [--seed S]
        [--mesh 1x1x1x1] [--layout seed] [--max-memory-gb G] [--force] [--json]
"""

import json

from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes, progress
from moejax.config.model import DTYPES
from moejax.parallel.mesh import parse_mesh


def run(args):
    from moejax.checkpoint.make import make

    rep = make(args.config, args.out, args.format, args.dtype, args.seed, parse_mesh(args.mesh), args.layout,
               args.max_memory_gb, args.max_shard_gb, args.force, progress("writing tensors") if args.progress else None)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(f"wrote a random {rep['config']} checkpoint ({rep['format']}, {rep['dtype']}, {rep['bytes'] / 1e9:.3f} GB) to "
          f"{args.out} in {rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        print(json.dumps(rep))


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["moejax", "hf"], default="moejax")
    ap.add_argument("--dtype", choices=DTYPES, help="default: the config's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mesh", default="1x1x1x1", help="the mesh the chunks are cut for (moejax format)")
    ap.add_argument("--layout", default="seed")
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size (hf format)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    return guarded(run, ap.parse_args(argv))
