#!/usr/bin/env python
"""Restore a checkpoint onto a mesh and save it laid out for that mesh, then verify it.

    python scripts/reshard.py SRC DST --mesh 4x2x4x4 [--layout meshes/seed.yaml] [--dtype D] [--force] [--json]

Each device reads only its own shards of SRC. Parameters never split over `dp`, so the work runs on
the devices of one dp replica: replicas would only hold copies. SRC's tensors are checked against the
checksums saved with them as they are read. DST is written to a temporary directory, then verified
from what is on disk: every tensor of DST is read back and checked against DST's saved checksums,
and those must equal the checksums of SRC's tensors after the declared cast, which this script
computes independently of the cast it wrote (on the host, slice by slice, with NumPy/ml_dtypes). Only
then is DST moved into place; an existing DST is replaced only with --force. On any failure nothing
is left at DST (or the old DST stays).

Test hook (used only by tests/test_defects_checkpoint.py): MOEJAX_RESHARD_TEST_DAMAGE=NAME adds 1 to
the first element of tensor NAME before DST is written, which verification must catch.
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


def expected_checksums(params: dict, meta: dict, dtype: str) -> dict:
    """Checksums DST must have: SRC's own (restore checked the tensors against them) when the dtype
    stays; after a cast, those of SRC's tensors converted on the host by NumPy/ml_dtypes, one slice
    at a time, independently of the device cast that DST is written from."""
    import numpy as np

    from moejax import checkpoint
    from moejax.hf import _np_dtype

    if dtype == meta["dtype"]:
        saved = meta.get("checksums")
        return dict(saved["tensors"]) if saved else checkpoint.tensor_checksums(params)
    to = _np_dtype(dtype)
    out = {}
    for n, a in sorted(params.items()):
        blocks = (np.asarray(a[i]).astype(to) for i in range(a.shape[0])) if a.ndim else [np.asarray(a).astype(to)]
        out[n] = checkpoint.checksum_of_blocks(blocks)
    return out


def verify_written(tmp: str, want: dict, mesh, layout, src_name: str) -> int:
    """Read the written checkpoint back from disk (restore checks each tensor against the checksums
    saved with it) and compare those checksums with `want`. Returns the number of tensors verified."""
    from moejax import checkpoint

    meta, _ = checkpoint.read_meta(tmp)
    got = (meta.get("checksums") or {}).get("tensors", {})
    bad = sorted(n for n in set(want) | set(got) if got.get(n) != want.get(n))
    if bad:
        raise UserError(f"verification failed: tensor(s) {', '.join(bad)} of the new checkpoint differ from {src_name} "
                        f"after the cast to {meta['dtype']}; nothing was written")
    checkpoint.restore(tmp, mesh, layout)
    return len(want)


def run(args):
    shape = parse_mesh(args.mesh)
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if src == dst:
        raise UserError("SRC and DST are the same directory: write to a new DST")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"{args.dst!r} exists and is not a directory: give a new path or a checkpoint directory")
    if os.path.exists(dst) and os.listdir(dst) and not args.force:
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
    if checkpoint.quant_of(meta) and dtype != meta["dtype"]:
        raise UserError(f"--dtype {dtype}: {args.src!r} is {checkpoint.quant_of(meta)}-quantized with {meta['dtype']} "
                        f"embeddings and norms; reshard it as it is, or quantize a {dtype} checkpoint")
    t0 = time.perf_counter()
    _, params, _ = checkpoint.restore(src, mesh, layout)  # checked against SRC's checksums
    want = expected_checksums(params, meta, dtype)
    if dtype != meta["dtype"]:
        params = {n: checkpoint.cast(a, dtype) for n, a in params.items()}
    damage = os.environ.get("MOEJAX_RESHARD_TEST_DAMAGE")
    if damage:  # test hook (see the module docstring)
        params[damage] = params[damage].at[(0,) * params[damage].ndim].add(1)
    nbytes = sum(a.size * a.dtype.itemsize for a in params.values())
    tmp = dst + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint.save(tmp, params, cfg, layout, dtype, str(shape), step=0)
        del params
        verified = verify_written(tmp, want, mesh, layout, args.src)
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
           "bytes_moved": nbytes, "seconds": secs, "peak_rss_bytes": peak_rss_bytes(),
           "verified": verified == len(want), "verified_tensors": verified}
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
