#!/usr/bin/env python
"""Import a Hugging Face Mixtral checkpoint (config.json + safetensors) as a moejax checkpoint, streaming.

    python scripts/import_hf.py HF_DIR OUT [--dtype bfloat16] [--max-memory-gb G] [--force] [--json]

Reads one HF tensor at a time and writes the stacked moejax tensors a block (a layer, a block of one
layer's experts) at a time, as reshard.py writes (see moejax/ckstream.py): memory stays at a few
blocks whatever the model's size; --max-memory-gb bounds it (default: a quarter of the free memory).
Refuses, naming the field, what moejax does not implement (sliding window, tied embeddings, biases,
RoPE scaling, ...). The new step is written to a temporary directory, read back from disk tensor by
tensor and checked against the checksums of what was written, and only then moved into place (OUT,
or the next step of an existing OUT with --force): a failure or a kill leaves OUT absent or as it was.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, peak_rss_bytes, progress  # noqa: E402
from moejax.config import DTYPES  # noqa: E402
from moejax.errors import UserError  # noqa: E402


def check_out(out: str, force: bool, what: str) -> None:
    """OUT must be a new path, an empty directory, or (with --force) an existing directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out!r} exists and is not a directory: give a new path or a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"{out!r} exists and is not empty: pass --force to {what}")


def run(args):
    check_out(args.out, args.force, "add a new step to it")
    import numpy as np

    from moejax import checkpoint, ckstream, hf
    from moejax.mesh import MeshShape
    from moejax.rules import load_layout

    bound = ckstream.memory_bound(args.max_memory_gb)
    t0 = time.perf_counter()
    cfg = hf.config_from_hf(args.hf_dir)
    reader = hf.HFReader(args.hf_dir, cfg)
    dtype = args.dtype or cfg.param_dtype
    cast = dtype != cfg.param_dtype
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    layout = load_layout("seed")
    out = os.path.abspath(args.out)
    step = 0
    if os.path.isdir(out) and os.listdir(out):
        step = checkpoint.read_meta(out)[1] + 1
        ckstream.remove_stale(os.path.join(out, f".{step}"))  # a killed import's .STEP.tmp-PID
        tmp = step_dir = os.path.join(out, f".{step}.tmp-{os.getpid()}")
    else:
        ckstream.remove_stale(out)
        tmp = out + f".tmp-{os.getpid()}"
        step_dir = os.path.join(tmp, "0")
    shutil.rmtree(tmp, ignore_errors=True)
    specs = {n: (s, dtype) for n, s in reader.shapes.items()}
    split = {name: len(idx) - 1 for (name, idx) in reader.units}
    shards = ckstream.shard_shapes(cfg, layout, MeshShape(1, 1, 1, 1))

    def fill(name, index, off):
        x = reader.block(name, index)
        return x.astype(hf._np_dtype(dtype)) if cast else x

    try:
        try:
            writer = ckstream.StepWriter(step_dir)
            written = ckstream.write_tensors(writer, specs, shards, fill, bound, split_axes=split,
                                             progress=progress("writing tensors") if args.progress else None)
            writer.finish({"format": checkpoint.FORMAT, "config": dataclasses.asdict(cfg), "layout": layout.name,
                           "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "quant": None,
                           "mesh": "1x1x1x1", "checksums": {"algorithm": checkpoint.CHECKSUM, "tensors": written}})
        except (OSError, ValueError) as e:
            err = e if isinstance(e, UserError) else ckstream.write_error(e, repr(args.out))
            if err is None:
                raise
            raise err from None
        finally:
            reader.close()
        back = ckstream.tensor_sums(os.path.join(step_dir, "params"), specs, bound, f"new checkpoint {args.out!r}")
        bad = sorted(n for n in specs if back[n] != written[n])
        if bad:
            raise ckstream.read_back_error(os.path.join(step_dir, "params"), bad, repr(args.out))
        if step_dir == tmp:
            os.rename(tmp, os.path.join(out, str(step)))
        else:
            checkpoint.read_meta(tmp)  # orbax sees one complete step
            ckstream.commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = sum(int(np.prod(s)) for s, _ in specs.values()) * np.dtype(hf._np_dtype(dtype)).itemsize
    rep = {"out": args.out, "step": step, "config": cfg.name, "params_total": cfg.param_count(), "dtype": dtype,
           "bytes": nbytes, "seconds": time.perf_counter() - t0, "max_memory_bytes": bound,
           "peak_rss_bytes": peak_rss_bytes(), "verified": True}
    print(f"imported {cfg.param_count():,} parameters ({dtype}) into {args.out} step {step} in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    ap = ArgumentParser(__doc__)
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    sys.exit(guarded(run, ap.parse_args()))
