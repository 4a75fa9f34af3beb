"""Reshard: rewrite a checkpoint laid out for another mesh (and dtype), streaming, then verify it.

The stacked tensors do not depend on the mesh: only the chunks on disk do. Each tensor is read from
SRC and written to DST one block at a time (blocks.py), with the chunks of DST cut along the shards
of the target mesh, so peak memory is a few blocks whatever the model's size. SRC's tensors are
checked against the checksums saved with them as they are read. DST is written to a temporary
directory, then verified from what is on disk: every tensor is read back, slice by slice, and its
checksum must equal both the one saved with DST and SRC's after the declared cast. Only then is DST
moved into place (transaction.py).

Test hook (tests/test_checkpoint_damage.py only): MOEJAX_RESHARD_TEST_DAMAGE=NAME adds 1 to the
first element of tensor NAME before DST is written, which verification must catch.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from moejax.checkpoint import blocks
from moejax.checkpoint.format import CHECKSUM, build_meta, config_of, hex_sums, host_sums, quant_of, saved_checksums
from moejax.checkpoint.storage import data_files, read_error
from moejax.checkpoint.store import read_meta, verify
from moejax.checkpoint.transaction import check_destination, commit_dir, staging_dir
from moejax.errors import UserError
from moejax.models.params import param_dtypes, param_shapes
from moejax.parallel.mesh import MeshShape
from moejax.parallel.rules import load_layout
from moejax.tokenizers import CKPT_SUBDIR, copy_tokenizer_files, tokenizer_dir


def reshard(src: str, dst: str, shape: MeshShape, layout: str | None = None, dtype: str | None = None,
            max_memory_gb: float | None = None, force: bool = False, progress=None) -> dict:
    """SRC -> DST for `shape` under `layout` (default SRC's) in `dtype` (default SRC's). Returns a report."""
    check_destination(dst, {"SRC": src}, force, "replace it (it is kept until the new one verifies)")
    bound = blocks.memory_bound(max_memory_gb)
    meta, step = read_meta(src)  # fails early on a bad SRC
    lay = load_layout(layout or meta["layout"])
    cfg = config_of(meta)
    lay.validate(cfg, shape)
    dtype, quant = dtype or meta["dtype"], quant_of(meta)
    if quant and dtype != meta["dtype"]:
        raise UserError(f"--dtype {dtype}: {src!r} is {quant}-quantized with {meta['dtype']} "
                        f"embeddings and norms; reshard it as it is, or quantize a {dtype} checkpoint")
    shapes = param_shapes(cfg, quant)
    src_dtypes, dst_dtypes = param_dtypes(cfg, meta["dtype"], quant), param_dtypes(cfg, dtype, quant)
    shards = blocks.shard_shapes(cfg, lay, MeshShape(1, shape.pp, shape.tp, shape.ep), quant)
    where = f"checkpoint {src!r} step {step}"
    src_params = os.path.join(os.path.abspath(src), str(step), "params")
    saved = saved_checksums(meta)
    if saved is None:
        verify({}, meta, where, src_params)  # the one-line warning
    elif meta["checksums"].get("algorithm") != CHECKSUM or set(saved) != set(shapes):
        raise UserError(f"{where}: checksum record {meta['checksums'].get('algorithm')!r} over {sorted(saved)} does "
                        f"not fit this moejax ({CHECKSUM} over {sorted(shapes)})")
    damage = os.environ.get("MOEJAX_RESHARD_TEST_DAMAGE")
    ctx = blocks.context()
    opened, src_sums, want_sums = {}, {}, {}

    def fill(name, idx, off):
        try:
            if name not in opened:
                opened[name] = blocks.open_read(src_params, name, ctx)
                src_sums[name] = want_sums[name] = np.zeros(2, np.uint32)
            x = opened[name][idx].read().result() if idx else opened[name].read().result()
        except ValueError as e:
            err = read_error(e, where, src_params)
            if err is None:
                raise
            raise err from None
        src_sums[name] = src_sums[name] + host_sums(x, off)
        if dst_dtypes[name] != src_dtypes[name]:
            x = x.astype(blocks.np_dtype(dst_dtypes[name]))
            want_sums[name] = want_sums[name] + host_sums(x, off)
        else:
            want_sums[name] = src_sums[name]
        if damage == name and off == 0:  # test hook (see the module docstring)
            x = x.copy()
            x.reshape(-1)[0] += 1
        return x

    def done(name):
        opened.pop(name, None)
        if saved is not None and hex_sums(src_sums[name]) != saved[name]:
            named = data_files(src_params, {name})
            raise UserError(f"{where}: tensor(s) {name} do not match the checksums saved with them: "
                            + (f"data file {', '.join(named)}" if named else f"the data files under {src_params}")
                            + " damaged (overwritten, truncated or a partial copy)")

    specs = {n: (s, dst_dtypes[n]) for n, s in shapes.items()}
    nbytes = sum(int(np.prod(s)) * np.dtype(blocks.np_dtype(d)).itemsize for s, d in specs.values())
    t0 = time.perf_counter()
    tmp = staging_dir(dst)
    try:
        try:
            writer = blocks.StepWriter(os.path.join(tmp, "0"))
            written = blocks.write_tensors(writer, specs, shards, fill, bound, done=done, progress=progress)
            writer.finish(build_meta(cfg, lay, dtype, str(shape), written, quant))
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else blocks.write_error(e, f"{dst!r}")
            if err is None:
                raise
            raise err from None
        t_write = time.perf_counter() - t0
        want = {n: hex_sums(v) for n, v in want_sums.items()}
        bad = sorted(n for n in want if written[n] != want[n])
        if bad:
            raise UserError(f"verification failed: tensor(s) {', '.join(bad)} of the new checkpoint differ from "
                            f"{src} after the cast to {dtype}; nothing was written")
        read_meta(tmp)  # orbax sees one complete step
        back = blocks.tensor_sums(os.path.join(tmp, "0", "params"), specs, bound, f"new checkpoint {tmp!r}")
        bad = sorted(n for n in want if back[n] != want[n])
        if bad:
            raise blocks.read_back_error(os.path.join(tmp, "0", "params"), bad, repr(dst))
        copy_tokenizer_files(tokenizer_dir(src), os.path.join(tmp, CKPT_SUBDIR))
        commit_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    return {"src": src, "dst": dst, "mesh": str(shape), "layout": lay.name, "dtype": dtype,
            "bytes_moved": nbytes, "seconds": secs, "write_seconds": t_write, "verify_seconds": secs - t_write,
            "max_memory_bytes": bound, "block_bytes": blocks.block_bytes(bound), "blocks": writer.blocks,
            "verified": len(back) == len(specs), "verified_tensors": len(back)}
