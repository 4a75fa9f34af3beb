#!/usr/bin/env python
"""Export a moejax checkpoint as a Hugging Face Mixtral checkpoint (config.json + safetensors), streaming.

    python scripts/export_hf.py CKPT OUT [--max-shard-gb 5] [--max-memory-gb G] [--force] [--json]

Reads one HF tensor's worth at a time (a layer's matrix, one expert's matrix) from CKPT and appends it
to the safetensors file being written, so memory stays at a few such tensors whatever the model's
size. Every tensor of CKPT is checked against the checksums saved with it as it is read, and the
written files are read back, tensor by tensor, and must give the same checksums. OUT is written to
a temporary directory and moved into place when verified; an existing OUT is replaced only with
--force. A kill or a failure leaves OUT absent or as it was.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, peak_rss_bytes, progress  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def run(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"{args.out!r} exists and is not a directory: give a new path or a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise UserError(f"{args.out!r} exists and is not empty: pass --force to replace it")
    if not args.max_shard_gb > 0:
        raise UserError(f"--max-shard-gb {args.max_shard_gb} must be > 0")
    import numpy as np

    from moejax import checkpoint, ckstream, hf
    from moejax.checkpoint import _hex, _host_sums
    from moejax.rules import param_shapes

    ckstream.memory_bound(args.max_memory_gb)  # validated; one HF tensor at a time is far below any bound
    t0 = time.perf_counter()
    meta, step = checkpoint.read_meta(args.ckpt)
    checkpoint.refuse_quantized(meta, args.ckpt, "export_hf.py")
    cfg = dataclasses.replace(checkpoint.config_of(meta), param_dtype=meta["dtype"])  # the dtype stored
    shapes = param_shapes(cfg)
    where = f"checkpoint {args.ckpt!r} step {step}"
    params_dir = os.path.join(os.path.abspath(args.ckpt), str(step), "params")
    saved = (meta.get("checksums") or {}).get("tensors")
    if saved is None:
        checkpoint.verify({}, meta, where, params_dir)  # the one-line warning
    ctx = ckstream._context()
    hf_names, hf_sums = {(n, i): h for (n, i), (h, _) in hf.units(cfg).items()}, {}
    opened, cached, sums = {}, {}, {n: np.zeros(2, np.uint32) for n in shapes}

    def offset(name, idx):
        s = shapes[name]
        return int(np.ravel_multi_index(idx, s[:len(idx)])) * int(np.prod(s[len(idx):])) if idx else 0

    def fill(name, idx):
        try:
            if name not in opened:
                opened[name] = ckstream.open_read(params_dir, name, ctx)
            if not idx:
                x = opened[name].read().result()
            else:  # one layer of the tensor at a time, kept while its HF tensors are written
                if cached.get(name, (None,))[0] != idx[0]:
                    cached[name] = (idx[0], opened[name][idx[0]].read().result())
                x = cached[name][1][idx[1:]]
        except ValueError as e:
            err = checkpoint.read_error(e, where, params_dir)
            if err is None:
                raise
            raise err from None
        sums[name] += _host_sums(x, offset(name, idx))
        y = hf.to_hf(name, x)
        hf_sums[hf_names[(name, idx)]] = _hex(_host_sums(y, 0))  # of the bytes written, for the read-back
        return y

    out = os.path.abspath(args.out)
    ckstream.remove_stale(out)
    tmp = out + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf.config_to_hf(cfg), f, indent=2)
            files = hf.write_hf_streaming(tmp, cfg, fill, int(args.max_shard_gb * 2**30),
                                          progress("writing tensors") if args.progress else None)
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else ckstream.write_error(e, repr(args.out))
            if err is None:
                raise
            raise err from None
        got = {n: _hex(v) for n, v in sums.items()}
        if saved is not None:
            bad = sorted(n for n in shapes if got[n] != saved[n])
            if bad:
                named = checkpoint._data_files(params_dir, set(bad))
                raise UserError(f"{where}: tensor(s) {', '.join(bad)} do not match the checksums saved with them: "
                                + (f"data file {', '.join(named)}" if named else f"the data files under {params_dir}")
                                + " damaged (overwritten, truncated or a partial copy)")
        back = {}  # the written files, read back tensor by tensor
        for f in files:
            back.update(ckstream.safetensors_sums(os.path.join(tmp, f)))
        bad = sorted(n for n in set(back) | set(hf_sums) if back.get(n) != hf_sums.get(n))
        if bad:
            raise UserError(f"verification failed: tensor(s) {', '.join(bad)} read back from the exported files differ "
                            f"from {args.ckpt}; nothing was written")
        ckstream.commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep = {"out": args.out, "files": files, "params_total": cfg.param_count(), "dtype": meta["dtype"],
           "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files),
           "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(), "verified": True}
    print(f"exported {cfg.param_count():,} parameters to {args.out} ({len(files)} file(s)) in {rep['seconds']:.1f} s, "
          f"peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    sys.exit(guarded(run, ap.parse_args()))
