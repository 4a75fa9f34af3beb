"""Export a moejax checkpoint as Hugging Face safetensors (config.json and one file or shards with an
index), one HF tensor at a time. The source's tensors are checked against their saved checksums as
they are read, and every written tensor is read back from the files before OUT is put in place."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from moejax.checkpoint import blocks, hf
from moejax.checkpoint.format import config_of, hex_sums, host_sums, saved_checksums
from moejax.checkpoint.storage import data_files, read_error
from moejax.checkpoint.store import read_meta, refuse_quantized, verify
from moejax.checkpoint.transaction import check_destination, commit_dir, staging_dir
from moejax.errors import UserError
from moejax.models import counts
from moejax.models.hf_map import hf_merged, join
from moejax.models.params import param_shapes
from moejax.tokenizers import copy_tokenizer_files, tokenizer_dir


def export_hf(ckpt: str, out: str, max_shard_gb: float = 5.0, max_memory_gb: float | None = None,
              force: bool = False, progress=None) -> dict:
    check_destination(out, {"CKPT": ckpt}, force)
    given = out
    if not max_shard_gb > 0:
        raise UserError(f"--max-shard-gb {max_shard_gb} must be > 0")
    blocks.memory_bound(max_memory_gb)  # validated; one HF tensor at a time is far below any bound
    t0 = time.perf_counter()
    meta, step = read_meta(ckpt)
    refuse_quantized(meta, ckpt, "export-hf")
    cfg = dataclasses.replace(config_of(meta), param_dtype=meta["dtype"])  # the dtype stored
    shapes = param_shapes(cfg)
    where = f"checkpoint {ckpt!r} step {step}"
    params_dir = os.path.join(os.path.abspath(ckpt), str(step), "params")
    saved = saved_checksums(meta)
    if saved is None:
        verify({}, meta, where, params_dir)  # the one-line warning
    ctx = blocks.context()
    hf_names, hf_sums = {(n, i): h for (n, i), (h, _) in hf.units(cfg).items()}, {}
    merged, parts = hf_merged(cfg), {}  # HF tensors several slices make up: summed once all are read
    opened, cached, sums = {}, {}, {n: np.zeros(2, np.uint32) for n in shapes}

    def offset(name, idx):
        s = shapes[name]
        return int(np.ravel_multi_index(idx, s[:len(idx)])) * int(np.prod(s[len(idx):])) if idx else 0

    def fill(name, idx):
        try:
            if name not in opened:
                opened[name] = blocks.open_read(params_dir, name, ctx)
            if not idx:
                x = opened[name].read().result()
            else:  # one layer of the tensor at a time, kept while its HF tensors are written
                if cached.get(name, (None,))[0] != idx[0]:
                    cached[name] = (idx[0], opened[name][idx[0]].read().result())
                x = cached[name][1][idx[1:]]
        except ValueError as e:
            err = read_error(e, where, params_dir)
            if err is None:
                raise
            raise err from None
        sums[name] += host_sums(x, offset(name, idx))
        y = hf.to_hf(cfg, name, x)
        h = hf_names[(name, idx)]
        if h in merged:
            parts.setdefault(h, {})[(name, idx)] = y
            if len(parts[h]) == len(merged[h]):
                got = parts.pop(h)
                hf_sums[h] = hex_sums(host_sums(join([got[p] for p in merged[h]]), 0))
        else:
            hf_sums[h] = hex_sums(host_sums(y, 0))  # of the bytes written, for the read-back
        return y

    out = os.path.abspath(out)
    tmp = staging_dir(out)
    try:
        try:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf.config_to_hf(cfg), f, indent=2)
            files = hf.write_hf_streaming(tmp, cfg, fill, int(max_shard_gb * 2**30), progress)
            tok_files = copy_tokenizer_files(tokenizer_dir(ckpt), tmp)  # the checkpoint's tokenizer, if any
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else blocks.write_error(e, repr(out))
            if err is None:
                raise
            raise err from None
        got = {n: hex_sums(v) for n, v in sums.items()}
        if saved is not None:
            bad = sorted(n for n in shapes if got[n] != saved[n])
            if bad:
                named = data_files(params_dir, set(bad))
                raise UserError(f"{where}: tensor(s) {', '.join(bad)} do not match the checksums saved with them: "
                                + (f"data file {', '.join(named)}" if named else f"the data files under {params_dir}")
                                + " damaged (overwritten, truncated or a partial copy)")
        back = {}  # the written files, read back tensor by tensor
        for f in files:
            back.update(blocks.safetensors_sums(os.path.join(tmp, f)))
        bad = sorted(n for n in set(back) | set(hf_sums) if back.get(n) != hf_sums.get(n))
        if bad:
            raise UserError(f"verification failed: tensor(s) {', '.join(bad)} read back from the exported files differ "
                            f"from {ckpt}; nothing was written")
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": given, "files": files, "params_total": counts.param_count(cfg), "dtype": meta["dtype"],
            "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files),
            "seconds": time.perf_counter() - t0, "verified": True, "tokenizer_files": tok_files}
