#!/usr/bin/env python
"""Write a random-weight checkpoint of any config without holding it in memory (for tests and benchmarks).

    python scripts/make_checkpoint.py --config C --out DIR [--format moejax|hf] [--dtype D] [--seed S]
        [--mesh 1x1x1x1] [--layout seed] [--max-memory-gb G] [--force] [--json]

Weights are drawn one matrix at a time (a layer's attention matrix, one expert's matrix, the whole
embedding): normal with standard deviation 0.02, norms 1. Each matrix's draw depends only on
--seed, the tensor and the matrix's index, so the values do not depend on --max-memory-gb, the
format or the mesh: `--format hf` then import_hf.py gives the same tensors as `--format moejax`.
A moejax checkpoint is written as reshard.py writes one (chunks along the shards of --mesh, checksums
in its metadata) to a temporary directory that is moved to DIR when complete.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, peak_rss_bytes, progress  # noqa: E402
from moejax.config import DTYPES  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def unit_axes(shape: tuple) -> int:
    """Axes that index the matrices a tensor is drawn in (the last two axes form one matrix)."""
    return max(0, len(shape) - 2)


def random_block(seed: int, tensor: str, shape: tuple, idx: tuple, dtype: str):
    """The block `idx` (whole matrices: ints and one slice over the matrix-index axes) of tensor `tensor`."""
    import numpy as np
    import zlib

    from moejax.ckstream import np_dtype

    tag = zlib.crc32(tensor.encode())
    u = unit_axes(shape)
    if u == 0:
        lead = [()]
    else:
        ranges = [range(*i.indices(shape[j])) if isinstance(i, slice) else [i] for j, i in enumerate(idx[:u])]
        ranges += [range(shape[j]) for j in range(len(idx), u)]
        lead = list(np.ndindex(*[len(r) for r in ranges]))
        lead = [tuple(r[k] for r, k in zip(ranges, ix)) for ix in lead]
    mat = shape[u:]
    out = []
    for ix in lead:
        flat = int(np.ravel_multi_index(ix, shape[:u])) if u else 0
        if tensor.endswith("norm"):
            m = np.ones(mat, np.float32)
        else:
            m = np.random.default_rng([seed, tag, flat]).standard_normal(mat, dtype=np.float32) * np.float32(0.02)
        out.append(m.astype(np_dtype(dtype)))
    if u == 0:
        return out[0][idx] if idx else out[0]
    bshape = tuple(len(range(*i.indices(shape[j]))) if isinstance(i, slice) else None for j, i in enumerate(idx))
    bshape = tuple(b for b in bshape if b is not None) + tuple(shape[len(idx):])
    return np.stack(out).reshape(bshape)


def run(args):
    from moejax import ckstream
    from moejax.config import load_config
    from moejax.mesh import MeshShape, parse_mesh
    from moejax.rules import load_layout, param_shapes

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{args.out!r} exists and is not a directory: give a new path")
    if os.path.exists(out) and os.listdir(out) and not args.force:
        raise UserError(f"{args.out!r} exists and is not empty: pass --force to replace it")
    cfg = load_config(args.config)
    dtype = args.dtype or cfg.param_dtype
    if dtype != cfg.param_dtype:
        import dataclasses

        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    shape = parse_mesh(args.mesh)
    layout = load_layout(args.layout)
    layout.validate(cfg, shape)
    bound = ckstream.memory_bound(args.max_memory_gb)
    shapes = param_shapes(cfg)
    t0 = time.perf_counter()
    ckstream.remove_stale(out)
    tmp = out + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    show = progress("writing tensors") if args.progress else None
    try:
        try:
            if args.format == "moejax":
                nbytes = _write_moejax(tmp, cfg, layout, shape, dtype, shapes, bound, args.seed, show)
            else:
                nbytes = _write_hf(tmp, cfg, dtype, shapes, args.seed, args.max_shard_gb, show)
        except OSError as e:
            err = ckstream.write_error(e, repr(args.out))
            if err is None:
                raise
            raise err from None
        except ValueError as e:
            err = ckstream.write_error(e, repr(args.out))
            if err is None:
                raise
            raise err from None
        ckstream.commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep = {"out": args.out, "config": cfg.name, "format": args.format, "dtype": dtype, "seed": args.seed,
           "params_total": cfg.param_count(), "bytes": nbytes, "seconds": time.perf_counter() - t0,
           "peak_rss_bytes": peak_rss_bytes()}
    print(f"wrote a random {cfg.name} checkpoint ({args.format}, {dtype}, {nbytes / 1e9:.3f} GB) to {args.out} in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        print(json.dumps(rep))


def _write_moejax(tmp, cfg, layout, shape, dtype, shapes, bound, seed, show):
    import dataclasses

    import numpy as np

    from moejax import checkpoint, ckstream
    from moejax.mesh import MeshShape

    specs = {n: (s, dtype) for n, s in shapes.items()}
    shards = ckstream.shard_shapes(cfg, layout, MeshShape(1, shape.pp, shape.tp, shape.ep))
    split = {n: unit_axes(s) - 1 for n, s in shapes.items()}  # blocks of whole matrices
    writer = ckstream.StepWriter(os.path.join(tmp, "0"))
    sums = ckstream.write_tensors(writer, specs, shards, lambda n, idx, off: random_block(seed, n, shapes[n], idx, dtype),
                                  bound, split_axes=split, progress=show)
    writer.finish({"format": checkpoint.FORMAT, "config": dataclasses.asdict(cfg), "layout": layout.name,
                   "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "quant": None,
                   "mesh": str(shape), "checksums": {"algorithm": checkpoint.CHECKSUM, "tensors": sums}})
    return sum(int(np.prod(s)) * np.dtype(ckstream.np_dtype(dtype)).itemsize for s in shapes.values())


def _write_hf(tmp, cfg, dtype, shapes, seed, max_shard_gb, show):
    import numpy as np

    from moejax import ckstream, hf

    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf.config_to_hf(cfg), f, indent=2)

    def fill(name, idx):
        return hf.to_hf(name, random_block(seed, name, shapes[name], idx, dtype))

    hf.write_hf_streaming(tmp, cfg, fill, int(max_shard_gb * 2**30), show)
    return cfg.param_count() * np.dtype(ckstream.np_dtype(dtype)).itemsize


if __name__ == "__main__":
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
    sys.exit(guarded(run, ap.parse_args()))
