#!/usr/bin/env python
"""Restore a checkpoint onto a mesh and save it laid out for that mesh, then verify it.

    python scripts/reshard.py SRC DST --mesh 4x2x4x4 [--layout meshes/seed.yaml] [--dtype D] [--force] [--json]

Each device reads only its own shards of SRC. Parameters never split over `dp`, so the work runs on
the devices of one dp replica: replicas would only hold copies. DST is written to a temporary
directory, verified against SRC (fingerprints of every tensor: bit-equal, or equal after the declared
dtype cast), and only then moved into place; an existing DST is replaced only with --force.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, limit_malloc_arenas, peak_rss_bytes  # noqa: E402
from moejax.config import DTYPES  # noqa: E402
from moejax.errors import UserError  # noqa: E402
from moejax.mesh import parse_mesh, provision_host_devices  # noqa: E402


def fingerprint(a):
    """Two uint32 sums over the bit patterns of `a` (one position-weighted): any change shows.
    Elementwise in `a`'s own shape, so that every device reduces its own shard (a reshape to 1-D
    would gather the whole tensor onto every device)."""
    import jax
    import jax.numpy as jnp

    def f(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32).astype(jnp.uint32)
        pos, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for ax in reversed(range(x.ndim)):
            pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, ax) * jnp.uint32(stride % 2**32)
            stride *= x.shape[ax]
        pos = pos * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * pos, dtype=jnp.uint32)])

    return tuple(int(v) for v in jax.jit(f)(a))


def run(args):
    shape = parse_mesh(args.mesh)
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if src == dst:
        raise UserError("SRC and DST are the same directory: write to a new DST")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not args.force:
        raise UserError(f"{args.dst!r} exists: pass --force to replace it (it is kept until the new one verifies)")
    provision_host_devices(shape.size)  # before anything starts JAX (orbax does)
    import jax

    from moejax.checkpoint import read_meta

    meta, _ = read_meta(src)  # fails early on a bad SRC, before any device work

    from moejax import checkpoint
    from moejax.mesh import MeshShape, make_mesh
    from moejax.rules import load_layout

    layout = load_layout(args.layout or meta["layout"])
    cfg = checkpoint.config_of(meta)
    layout.validate(cfg, shape)
    if jax.default_backend() != "cpu" and jax.device_count() < shape.size:
        raise UserError(f"mesh {shape} needs {shape.size} devices; this machine has {jax.device_count()}")
    replica = MeshShape(1, shape.pp, shape.tp, shape.ep)  # parameters are identical across dp
    mesh = make_mesh(replica)
    dtype = args.dtype or meta["dtype"]
    t0 = time.perf_counter()
    _, params, _ = checkpoint.restore(src, mesh, layout)
    want = {n: fingerprint(checkpoint.cast(a, dtype) if dtype != meta["dtype"] else a) for n, a in params.items()}
    if dtype != meta["dtype"]:
        params = {n: checkpoint.cast(a, dtype) for n, a in params.items()}
    nbytes = sum(a.size * a.dtype.itemsize for a in params.values())
    tmp = dst + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint.save(tmp, params, cfg, layout, dtype, str(shape), step=0)
        del params
        _, back, _ = checkpoint.restore(tmp, mesh, layout)
        for n, a in back.items():
            if fingerprint(a) != want[n]:
                raise UserError(f"verification failed: {n} in the new checkpoint differs from {args.src}")
        del back
        if os.path.exists(dst):
            old = dst + f".old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    rep = {"src": args.src, "dst": args.dst, "mesh": str(shape), "layout": layout.name, "dtype": dtype,
           "bytes_moved": nbytes, "seconds": secs, "peak_rss_bytes": peak_rss_bytes(), "verified": True}
    print(f"resharded {args.src} -> {args.dst} for mesh {shape} ({layout.name}, {dtype}): {nbytes / 1e9:.3f} GB "
          f"in {secs:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--layout", help="default: the layout SRC was saved for")
    ap.add_argument("--dtype", choices=DTYPES, help="default: SRC's dtype")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    limit_malloc_arenas()
    sys.exit(guarded(run, args))
