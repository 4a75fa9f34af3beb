#!/usr/bin/env python
"""Rewrite a checkpoint laid out for another mesh (and dtype), streaming, then verify it.

    python scripts/reshard.py SRC DST --mesh 4x2x4x4 [--layout meshes/seed.yaml] [--dtype D]
        [--max-memory-gb G] [--force] [--json]

The stacked tensors do not depend on the mesh: only the chunks on disk do. Each tensor is read from
SRC and written to DST one block at a time (a layer, or a block of experts of one layer: see
moejax/ckstream.py), with the chunks of DST cut along the shards of --mesh, so peak memory is a few
blocks whatever the model's size; --max-memory-gb bounds it (default: a quarter of the memory free
now). SRC's tensors are checked against the checksums saved with them as they are read. DST is
written to a temporary directory, then verified from what is on disk: every tensor of DST is read
back, slice by slice, and its checksum must equal both the one saved with DST and SRC's after the
declared cast (computed from SRC's blocks converted on the host by NumPy/ml_dtypes). Only then is DST
moved into place; an existing DST is replaced only with --force. On any failure, or a kill, nothing
is left at DST (or the old DST stays); a later run removes a killed run's temporary directory.

Test hook (used only by tests/test_defects_checkpoint.py): MOEJAX_RESHARD_TEST_DAMAGE=NAME adds 1 to
the first element of tensor NAME before DST is written, which verification must catch.
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
from moejax.mesh import parse_mesh  # noqa: E402


def run(args):
    shape = parse_mesh(args.mesh)
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if src == dst:
        raise UserError("SRC and DST are the same directory: write to a new DST")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"{args.dst!r} exists and is not a directory: give a new path or a checkpoint directory")
    if os.path.exists(dst) and os.listdir(dst) and not args.force:
        raise UserError(f"{args.dst!r} exists: pass --force to replace it (it is kept until the new one verifies)")
    import numpy as np

    from moejax import checkpoint, ckstream
    from moejax.checkpoint import _hex, _host_sums
    from moejax.mesh import MeshShape
    from moejax.rules import load_layout, param_dtypes, param_shapes

    bound = ckstream.memory_bound(args.max_memory_gb)
    meta, step = checkpoint.read_meta(src)  # fails early on a bad SRC
    layout = load_layout(args.layout or meta["layout"])
    cfg = checkpoint.config_of(meta)
    layout.validate(cfg, shape)
    dtype, quant = args.dtype or meta["dtype"], checkpoint.quant_of(meta)
    if quant and dtype != meta["dtype"]:
        raise UserError(f"--dtype {dtype}: {args.src!r} is {quant}-quantized with {meta['dtype']} "
                        f"embeddings and norms; reshard it as it is, or quantize a {dtype} checkpoint")
    shapes, src_dtypes, dst_dtypes = param_shapes(cfg, quant), param_dtypes(meta["dtype"], quant), param_dtypes(dtype, quant)
    shards = ckstream.shard_shapes(cfg, layout, MeshShape(1, shape.pp, shape.tp, shape.ep), quant)
    where = f"checkpoint {args.src!r} step {step}"
    src_params = os.path.join(src, str(step), "params")
    saved = (meta.get("checksums") or {}).get("tensors")
    if saved is None:
        checkpoint.verify({}, meta, where, src_params)  # the one-line warning
    elif meta["checksums"].get("algorithm") != checkpoint.CHECKSUM or set(saved) != set(shapes):
        raise UserError(f"{where}: checksum record {meta['checksums'].get('algorithm')!r} over {sorted(saved)} does "
                        f"not fit this moejax ({checkpoint.CHECKSUM} over {sorted(shapes)})")
    damage = os.environ.get("MOEJAX_RESHARD_TEST_DAMAGE")
    ctx = ckstream._context()
    opened, src_sums, want_sums = {}, {}, {}

    def fill(name, idx, off):
        try:
            if name not in opened:
                opened[name] = ckstream.open_read(src_params, name, ctx)
                src_sums[name] = want_sums[name] = np.zeros(2, np.uint32)
            x = opened[name][idx].read().result() if idx else opened[name].read().result()
        except ValueError as e:
            err = checkpoint.read_error(e, where, src_params)
            if err is None:
                raise
            raise err from None
        src_sums[name] = src_sums[name] + _host_sums(x, off)
        if dst_dtypes[name] != src_dtypes[name]:
            x = x.astype(ckstream.np_dtype(dst_dtypes[name]))
            want_sums[name] = want_sums[name] + _host_sums(x, off)
        else:
            want_sums[name] = src_sums[name]
        if damage == name and off == 0:  # test hook (see the module docstring)
            x = x.copy()
            x.reshape(-1)[0] += 1
        return x

    def done(name):
        opened.pop(name, None)
        if saved is not None and _hex(src_sums[name]) != saved[name]:
            named = checkpoint._data_files(src_params, {name})
            raise UserError(f"{where}: tensor(s) {name} do not match the checksums saved with them: "
                            + (f"data file {', '.join(named)}" if named else f"the data files under {src_params}")
                            + " damaged (overwritten, truncated or a partial copy)")

    specs = {n: (s, dst_dtypes[n]) for n, s in shapes.items()}
    nbytes = sum(int(np.prod(s)) * np.dtype(ckstream.np_dtype(d)).itemsize for s, d in specs.values())
    t0 = time.perf_counter()
    ckstream.remove_stale(dst)
    tmp = dst + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            writer = ckstream.StepWriter(os.path.join(tmp, "0"))
            written = ckstream.write_tensors(writer, specs, shards, fill, bound, done=done,
                                             progress=progress("writing tensors") if args.progress else None)
            writer.finish({"format": checkpoint.FORMAT, "config": meta["config"], "layout": layout.name,
                           "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "quant": quant,
                           "mesh": str(shape), "checksums": {"algorithm": checkpoint.CHECKSUM, "tensors": written}})
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else ckstream.write_error(e, f"{args.dst!r}")
            if err is None:
                raise
            raise err from None
        t_write = time.perf_counter() - t0
        want = {n: _hex(v) for n, v in want_sums.items()}
        bad = sorted(n for n in want if written[n] != want[n])
        if bad:
            raise UserError(f"verification failed: tensor(s) {', '.join(bad)} of the new checkpoint differ from "
                            f"{args.src} after the cast to {dtype}; nothing was written")
        checkpoint.read_meta(tmp)  # orbax sees one complete step
        back = ckstream.tensor_sums(os.path.join(tmp, "0", "params"), specs, bound, f"new checkpoint {tmp!r}")
        bad = sorted(n for n in want if back[n] != want[n])
        if bad:
            raise ckstream.read_back_error(os.path.join(tmp, "0", "params"), bad, repr(args.dst))
        ckstream.commit_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    rep = {"src": args.src, "dst": args.dst, "mesh": str(shape), "layout": layout.name, "dtype": dtype,
           "bytes_moved": nbytes, "seconds": secs, "write_seconds": t_write, "verify_seconds": secs - t_write,
           "max_memory_bytes": bound, "block_bytes": ckstream.block_bytes(bound), "blocks": writer.blocks, "peak_rss_bytes": peak_rss_bytes(),
           "verified": len(back) == len(specs), "verified_tensors": len(back)}
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
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true", help="a progress line on stderr")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    sys.exit(guarded(run, ap.parse_args()))
