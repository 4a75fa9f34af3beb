#!/usr/bin/env python
"""Score a text file with a moejax checkpoint the way Hugging Face scores it.

    python scripts/eval.py --ckpt runs/shakespeare/model --data data/tinyshakespeare.txt --split val \\
        --seq-len 256 --json

Consecutive non-overlapping windows of --seq-len bytes from offset 0 of the split (a partial last
window is dropped), all scored as one batch exactly as `MixtralForCausalLM(input_ids=w, labels=w,
output_router_logits=True)` scores them: cross-entropy over each window's last T-1 positions and
the load-balancing loss over every layer's router rows. The last stdout line is JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, limit_malloc_arenas  # noqa: E402
from moejax.config import DTYPES, KERNELS, POLICIES  # noqa: E402
from moejax.errors import UserError  # noqa: E402
from moejax.mesh import parse_mesh, provision_host_devices  # noqa: E402


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--ckpt", required=True, help="moejax checkpoint directory (its latest complete step)")
    ap.add_argument("--data", required=True, help="byte-level text file")
    ap.add_argument("--seq-len", type=int, required=True, help="bytes per window")
    ap.add_argument("--split", default="all", choices=("all", "train", "val"),
                    help="all of the file, or train.py's first 90%% / last 10%%")
    ap.add_argument("--mesh", default="1x1x1x1", help="DPxPPxTPxEP")
    ap.add_argument("--layout", default="meshes/seed.yaml")
    ap.add_argument("--max-windows", type=int, help="score at most this many windows (the first ones)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (float32 as transformers)")
    ap.add_argument("--capacity-policy", default="dropless", choices=POLICIES)
    ap.add_argument("--moe-kernel", default="auto", choices=KERNELS)
    ap.add_argument("--json", action="store_true", help="(the last line is always JSON)")
    return ap.parse_args(argv)


def run(args) -> dict:
    shape = parse_mesh(args.mesh)
    provision_host_devices(shape.size)
    from moejax import checkpoint, data, model
    from moejax.loss import Scorer
    from moejax.mesh import make_mesh
    from moejax.rules import load_layout

    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows {args.max_windows} must be >= 1")
    layout = load_layout(args.layout)
    meta, _ = checkpoint.read_meta(args.ckpt)
    cfg = checkpoint.config_of(meta)
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} must be in [2, {cfg.max_seq_len}] (the model's max_seq_len)")
    text = data.split(data.read_bytes(args.data), args.split)
    data.check_windows(text, args.seq_len, f"the {args.split} split of {args.data!r}")
    windows = data.consecutive_windows(text, args.seq_len, args.max_windows)
    mesh = make_mesh(shape)
    layout.validate(cfg, shape)
    rs = model.RunSpec(cfg, layout, shape, args.dtype, args.capacity_policy,
                       2.0 if args.capacity_policy == "dropless" else 1.25, 1, args.moe_kernel, training=True)
    _, params, _ = checkpoint.restore(args.ckpt, mesh, layout, dtype="float32")
    m = Scorer(rs, mesh).evaluate(params, windows)
    report = {"ce_loss": m["ce_loss"], "aux_loss": m["aux_loss"], "loss": m["loss"],
              "predicted_tokens": int(m["predicted_tokens"]), "perplexity": math.exp(m["ce_loss"]),
              "windows": int(len(windows)), "seq_len": args.seq_len, "max_load_ratio": m["max_load_ratio"],
              "router_aux_loss_coef": cfg.router_aux_loss_coef, "ckpt": args.ckpt, "split": args.split}
    print(f"{args.ckpt}: {len(windows)} windows of {args.seq_len} bytes ({args.split} split of {args.data}): "
          f"cross-entropy {m['ce_loss']:.4f} nats/byte (perplexity {report['perplexity']:.3f}), aux loss "
          f"{m['aux_loss']:.4f}, max/mean expert load {m['max_load_ratio']:.2f}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    limit_malloc_arenas()
    sys.exit(guarded(run, parse_args(sys.argv[1:])))
