"""Random-weight checkpoints of any config, written without holding the model in memory.

Weights are drawn one matrix at a time (a layer's attention matrix, one expert's matrix, the whole
embedding): normal with standard deviation 0.02, norms 1. Each matrix's draw depends only on the
seed, the tensor and the matrix's index, so the values do not depend on the memory bound, the
format or the mesh: the hf format imported gives the same tensors as the moejax format. A moejax
checkpoint is written as reshard.py writes one (chunks along the shards of the mesh, checksums in
its metadata) to a temporary directory that is moved into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib

import numpy as np

from moejax.checkpoint import blocks, hf
from moejax.checkpoint.format import build_meta
from moejax.checkpoint.transaction import check_destination, commit_dir, staging_dir
from moejax.config.model import load_config
from moejax.models import counts
from moejax.models.params import init_kind, param_dtypes, param_shapes
from moejax.parallel.mesh import MeshShape
from moejax.parallel.rules import load_layout

FORMATS = ("moejax", "hf")


def unit_axes(shape: tuple) -> int:
    """Axes that index the matrices a tensor is drawn in (the last two axes form one matrix)."""
    return max(0, len(shape) - 2)


def random_block(seed: int, tensor: str, shape: tuple, idx: tuple, dtype: str, init: str = "normal"):
    """The block `idx` (whole matrices: ints and one slice over the matrix-index axes) of tensor
    `tensor`; `init` is the family table's (`ones` for norms)."""
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
        if init in ("ones", "zeros"):
            m = (np.ones if init == "ones" else np.zeros)(mat, np.float32)
        else:
            m = np.random.default_rng([seed, tag, flat]).standard_normal(mat, dtype=np.float32) * np.float32(0.02)
        out.append(m.astype(blocks.np_dtype(dtype)))
    if u == 0:
        return out[0][idx] if idx else out[0]
    bshape = tuple(len(range(*i.indices(shape[j]))) if isinstance(i, slice) else None for j, i in enumerate(idx))
    bshape = tuple(b for b in bshape if b is not None) + tuple(shape[len(idx):])
    return np.stack(out).reshape(bshape)


def make(config: str, out: str, fmt: str = "moejax", dtype: str | None = None, seed: int = 0,
         shape: MeshShape = MeshShape(1, 1, 1, 1), layout: str = "seed", max_memory_gb: float | None = None,
         max_shard_gb: float = 5.0, force: bool = False, progress=None) -> dict:
    given = out
    check_destination(out, {}, force)
    cfg = load_config(config)
    dtype = dtype or cfg.param_dtype
    if dtype != cfg.param_dtype:
        import dataclasses

        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    lay = load_layout(layout)
    lay.validate(cfg, shape)
    bound = blocks.memory_bound(max_memory_gb)
    shapes = param_shapes(cfg)
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    tmp = staging_dir(out)
    try:
        try:
            if fmt == "moejax":
                nbytes = _write_moejax(tmp, cfg, lay, shape, dtype, shapes, bound, seed, progress)
            else:
                nbytes = _write_hf(tmp, cfg, dtype, shapes, seed, max_shard_gb, progress)
        except (OSError, ValueError) as e:
            err = blocks.write_error(e, repr(given))
            if err is None:
                raise
            raise err from None
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": given, "config": cfg.name, "format": fmt, "dtype": dtype, "seed": seed,
            "params_total": counts.param_count(cfg), "bytes": nbytes, "seconds": time.perf_counter() - t0}


def _write_moejax(tmp, cfg, layout, shape, dtype, shapes, bound, seed, show):
    dtypes = param_dtypes(cfg, dtype)
    specs = {n: (s, dtypes[n]) for n, s in shapes.items()}
    shards = blocks.shard_shapes(cfg, layout, MeshShape(1, shape.pp, shape.tp, shape.ep))
    split = {n: unit_axes(s) - 1 for n, s in shapes.items()}  # blocks of whole matrices
    writer = blocks.StepWriter(os.path.join(tmp, "0"))
    def fill(n, idx, off):
        return random_block(seed, n, shapes[n], idx, dtypes[n], init_kind(cfg, n))

    sums = blocks.write_tensors(writer, specs, shards, fill, bound, split_axes=split, progress=show)
    writer.finish(build_meta(cfg, layout, dtype, str(shape), sums))
    return sum(int(np.prod(s)) * np.dtype(blocks.np_dtype(d)).itemsize for s, d in specs.values())


def _write_hf(tmp, cfg, dtype, shapes, seed, max_shard_gb, show):
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf.config_to_hf(cfg), f, indent=2)

    dtypes = param_dtypes(cfg, dtype)

    def fill(name, idx):
        return hf.to_hf(cfg, name, random_block(seed, name, shapes[name], idx, dtypes[name], init_kind(cfg, name)))

    hf.write_hf_streaming(tmp, cfg, fill, int(max_shard_gb * 2**30), show)
    return sum(int(np.prod(s)) * np.dtype(blocks.np_dtype(dtypes[n])).itemsize for n, s in shapes.items())
