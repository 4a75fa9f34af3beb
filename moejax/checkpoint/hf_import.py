"""Import a Hugging Face checkpoint as a moejax checkpoint, streaming, then verify it.

Tensors are read one HF tensor (a layer's matrix, one expert's) at a time and written a block at a
time, as reshard.py writes, so memory stays at a few blocks. Every tensor is read back from the new
step and checked against the checksums written with it before the step is put in place: a new OUT is
committed as a whole; into an existing moejax checkpoint (--force) a new step is added by renaming
its finished directory. FP8 and MXFP4 tensors are dequantised as they are read (hf_formats.py) and
counted in the report's "converted".
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np

from moejax.checkpoint import blocks, hf
from moejax.checkpoint.format import build_meta
from moejax.checkpoint.store import read_meta
from moejax.checkpoint.transaction import check_destination, commit_dir, remove_stale, staging_dir
from moejax.errors import UserError
from moejax.models import counts
from moejax.models.params import param_dtypes
from moejax.parallel.mesh import MeshShape
from moejax.parallel.rules import load_layout
from moejax.tokenizers import CKPT_SUBDIR, copy_tokenizer_files, tokenizer_dir


def import_hf(hf_dir: str, out: str, dtype: str | None = None, max_memory_gb: float | None = None,
              force: bool = False, progress=None) -> dict:
    """HF_DIR -> a moejax checkpoint at OUT (a new directory, or a new step of OUT's checkpoint)."""
    check_destination(out, {"HF_DIR": hf_dir}, force, "add a new step to it", add_to=True)
    given = out
    bound = blocks.memory_bound(max_memory_gb)
    t0 = time.perf_counter()
    cfg = hf.config_from_hf(hf_dir)
    reader = hf.HFReader(hf_dir, cfg)
    dtype = dtype or cfg.param_dtype
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    dtypes = param_dtypes(cfg, dtype)  # float32 where the family keeps it so (a sigmoid router)
    layout = load_layout("seed")
    out = os.path.abspath(out)
    step = 0
    if os.path.isdir(out) and os.listdir(out):
        step = read_meta(out)[1] + 1
        remove_stale(os.path.join(out, f".{step}"))  # a killed import's .STEP.tmp-PID
        tmp = step_dir = os.path.join(out, f".{step}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp = staging_dir(out)
        step_dir = os.path.join(tmp, "0")
    specs = {n: (s, dtypes[n]) for n, s in reader.shapes.items()}
    split = {name: len(idx) - 1 for (name, idx) in reader.units}
    shards = blocks.shard_shapes(cfg, layout, MeshShape(1, 1, 1, 1))

    def fill(name, index, off):
        x = reader.block(name, index)
        want = blocks.np_dtype(dtypes[name])
        return x if x.dtype == want else x.astype(want)

    tok_files = []
    try:
        try:
            writer = blocks.StepWriter(step_dir)
            written = blocks.write_tensors(writer, specs, shards, fill, bound, split_axes=split, progress=progress)
            writer.finish(build_meta(cfg, layout, dtype, "1x1x1x1", written))
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else blocks.write_error(e, repr(out))
            if err is None:
                raise
            raise err from None
        finally:
            reader.close()
        back = blocks.tensor_sums(os.path.join(step_dir, "params"), specs, bound, f"new checkpoint {out!r}")
        bad = sorted(n for n in specs if back[n] != written[n])
        if bad:
            raise blocks.read_back_error(os.path.join(step_dir, "params"), bad, repr(out))
        if step_dir == tmp:  # a step added to a checkpoint: its tokenizer is kept if it has one
            if tokenizer_dir(out) is None:
                tok_files = copy_tokenizer_files(hf_dir, os.path.join(out, CKPT_SUBDIR))
            os.rename(tmp, os.path.join(out, str(step)))
        else:
            tok_files = copy_tokenizer_files(hf_dir, os.path.join(tmp, CKPT_SUBDIR))
            read_meta(tmp)  # orbax sees one complete step
            commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = sum(int(np.prod(s)) * np.dtype(blocks.np_dtype(d)).itemsize for s, d in specs.values())
    return {"out": given, "step": step, "config": cfg.name, "family": cfg.family, "params_total": counts.param_count(cfg),
            "dtype": dtype, "bytes": nbytes, "seconds": time.perf_counter() - t0, "max_memory_bytes": bound,
            "verified": True, "tokenizer_files": tok_files,
            "converted": {fmt: len(names) for fmt, names in reader.converted.items()},  # HF tensors dequantised
            "ignored_layers": {str(k): v for k, v in sorted(reader.past_layers().items())}}  # {layer: tensors}
