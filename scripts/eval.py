#!/usr/bin/env python
"""Score a text file with a moejax checkpoint the way Hugging Face scores it.

    python scripts/eval.py --ckpt runs/shakespeare/model --data data/tinyshakespeare.txt --split val \\
        --seq-len 256 --json

Consecutive non-overlapping windows of --seq-len bytes from offset 0 of the split (a partial last
window is dropped), all scored as one batch exactly as `MixtralForCausalLM(input_ids=w, labels=w,
output_router_logits=True)` scores them: cross-entropy over each window's last T-1 positions and
the load-balancing loss over every layer's router rows. The last stdout line is JSON.

--quant int8 measures what quantization costs instead: the windows go through the serving
program's forward (batches of --batch windows) twice, with the checkpoint's float weights and with
them quantized (quant.py, in the --quant-matmul form), and the report gives both cross-entropies,
their difference, the largest logit difference and how often both pick the same next byte.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, guarded, limit_malloc_arenas  # noqa: E402
from moejax.config import DTYPES, KERNELS, POLICIES, QUANT_MATMULS, QUANT_SCHEMES  # noqa: E402
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
    ap.add_argument("--quant", choices=QUANT_SCHEMES, help="compare the float weights with these (see above)")
    ap.add_argument("--quant-matmul", default="auto", choices=QUANT_MATMULS,
                    help="int8 matmul form (infer.py --help); auto: dynamic on CPU, dequant on GPU")
    ap.add_argument("--batch", type=int, default=16, help="windows per forward call under --quant")
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
    checkpoint.refuse_quantized(meta, args.ckpt, "eval.py (give it the float checkpoint and --quant int8)")
    cfg = checkpoint.config_of(meta)
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} must be in [2, {cfg.max_seq_len}] (the model's max_seq_len)")
    text = data.split(data.read_bytes(args.data), args.split)
    data.check_windows(text, args.seq_len, f"the {args.split} split of {args.data!r}")
    windows = data.consecutive_windows(text, args.seq_len, args.max_windows)
    mesh = make_mesh(shape)
    layout.validate(cfg, shape)
    if args.quant:
        if args.batch < 1:
            raise UserError(f"--batch {args.batch} must be >= 1")
        return compare_quant(args, cfg, layout, mesh, windows)
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


def compare_quant(args, cfg, layout, mesh, windows) -> dict:
    """Float against quantized weights on the same windows, through the serving forward."""
    import jax
    import numpy as np

    from moejax import checkpoint, model
    from moejax import quant as q8
    from moejax.generate import fetch, padded_batch, put
    from moejax.mesh import mesh_shape_of

    shape = mesh_shape_of(mesh)
    runs = {}
    for quant in (None, args.quant):
        rs = model.RunSpec(cfg, layout, shape, args.dtype, args.capacity_policy,
                           2.0 if args.capacity_policy == "dropless" else 1.25, 1, args.moe_kernel, quant=quant,
                           quant_matmul=args.quant_matmul)
        params = model.serving_params(checkpoint.load_weights(args.ckpt, cfg, 0, args.dtype, mesh, layout, quant),
                                      rs, mesh)
        runs[quant] = (rs, params, model.build(rs, mesh, "forward"))
    b = padded_batch(runs[None][0], min(args.batch, len(windows)))
    ce, agree, diff, peak, diff_sum, count = {None: 0.0, args.quant: 0.0}, 0, 0.0, 0.0, 0.0, 0
    for i in range(0, len(windows), b):
        chunk = windows[i:i + b]
        tok = np.zeros((b, windows.shape[1]), np.int32)
        tok[:len(chunk)] = chunk
        lengths = np.where(np.arange(b) < len(chunk), windows.shape[1], 0).astype(np.int32)
        logits = {}
        for quant, (rs, params, fwd) in runs.items():
            out = fwd(params, put(mesh, layout, "tokens", tok), put(mesh, layout, "lengths", lengths))[0]
            x = fetch(out)[:len(chunk), :-1].astype(np.float64)  # position t predicts byte t + 1
            top = x.max(-1, keepdims=True)
            logp = x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))
            ce[quant] += -np.take_along_axis(logp, chunk[:, 1:, None], axis=-1).sum()
            logits[quant] = x
        f, q = logits[None], logits[args.quant]
        agree += int(np.sum(f.argmax(-1) == q.argmax(-1)))
        diff, peak = max(diff, float(np.max(np.abs(f - q)))), max(peak, float(np.max(np.abs(f))))
        diff_sum += float(np.sum(np.abs(f - q)))
        count += chunk[:, 1:].size
    form = q8.resolve_matmul(args.quant_matmul, jax.default_backend())
    report = {"ckpt": args.ckpt, "split": args.split, "windows": int(len(windows)), "seq_len": args.seq_len,
              "dtype": args.dtype, "quant": args.quant, "quant_matmul": form, "predicted_tokens": count,
              "ce_loss_float": ce[None] / count, "ce_loss_quant": ce[args.quant] / count,
              "ce_loss_change": (ce[args.quant] - ce[None]) / count, "logits_max_abs_diff": diff,
              "logits_mean_abs_diff": diff_sum / (count * cfg.vocab_size),
              "logits_max_abs": peak, "next_token_agreement": agree / count}
    print(f"{args.ckpt}: {len(windows)} windows of {args.seq_len} bytes ({args.split} split), {args.dtype}: "
          f"cross-entropy {report['ce_loss_float']:.4f} float, {report['ce_loss_quant']:.4f} {args.quant} "
          f"({form} matmuls), change {report['ce_loss_change']:+.4f} nats/byte; logits |diff| mean "
          f"{report['logits_mean_abs_diff']:.3g}, max {diff:.3g} (of max |logit| {peak:.3g}); same next byte at "
          f"{report['next_token_agreement']:.2%} of positions")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    limit_malloc_arenas()
    sys.exit(guarded(run, parse_args(sys.argv[1:])))
