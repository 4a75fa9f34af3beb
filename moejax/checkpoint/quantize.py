"""Quantize a checkpoint's attention and expert matrices to int8 (ops/quant.py) into a new checkpoint,
read back against its checksums before it is moved into place; an existing OUT is never touched."""

from __future__ import annotations

import os
import shutil
import time

from moejax.checkpoint.format import quant_of
from moejax.checkpoint.store import read_meta, restore, save
from moejax.checkpoint.transaction import check_destination
from moejax.errors import UserError
from moejax.models.params import quant_dims
from moejax.ops.quant import quantize as quantize_params
from moejax.parallel.mesh import MeshShape, make_mesh
from moejax.parallel.rules import load_layout
from moejax.tokenizers import CKPT_SUBDIR, copy_tokenizer_files, tokenizer_dir


def quantize(ckpt: str, out: str, scheme: str = "int8") -> dict:
    check_destination(out, {"CKPT": ckpt}, force=None)
    given = out
    meta, _ = read_meta(ckpt)
    if quant_of(meta):
        raise UserError(f"checkpoint {ckpt!r} is already {quant_of(meta)}-quantized")
    t0 = time.perf_counter()
    mesh = make_mesh(MeshShape(1, 1, 1, 1))
    layout = load_layout(meta["layout"])
    cfg, params, _ = restore(ckpt, mesh, layout)
    before = sum(a.size * a.dtype.itemsize for a in params.values())
    params = quantize_params(params, quant_dims(cfg), scheme)
    after = sum(a.size * a.dtype.itemsize for a in params.values())
    out = os.path.abspath(out)
    tmp = out + f".tmp-{os.getpid()}"
    try:
        save(tmp, params, cfg, layout, meta["dtype"], "1x1x1x1", step=0)
        del params
        restore(tmp, mesh, layout)  # every tensor read back against its saved checksum
        copy_tokenizer_files(tokenizer_dir(ckpt), os.path.join(tmp, CKPT_SUBDIR))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ckpt": ckpt, "out": given, "scheme": scheme, "bytes_before": before, "bytes_after": after,
            "seconds": time.perf_counter() - t0}
