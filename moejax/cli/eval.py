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


from moejax.cli.common import ArgumentParser, guarded
from moejax.cli import flags
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_model(ap, ckpt_required=True)
    ap.add_argument("--data", required=True, help="text file (read through the checkpoint's tokenizer, else as bytes)")
    flags.add_tokenizer(ap)
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per window")
    ap.add_argument("--split", default="all", choices=("all", "train", "val"),
                    help="all of the file, or train.py's first 90%% / last 10%%")
    flags.add_mesh(ap)
    ap.add_argument("--max-windows", type=int, help="score at most this many windows (the first ones)")
    flags.add_dtype(ap, default="float32", help="compute dtype (default float32, as transformers)")
    flags.add_moe(ap)
    flags.add_quant(ap)
    ap.add_argument("--batch", type=int, default=16, help="windows per forward call under --quant")
    flags.add_json(ap, help="(the last line is always JSON)")
    return ap.parse_args(argv)


def run(args) -> dict:
    shape = parse_mesh(args.mesh)
    provision_host_devices(shape.size)
    from moejax.checkpoint import store as checkpoint
    from moejax.training import data
    from moejax.training.loss import Scorer
    from moejax.parallel.mesh import make_mesh
    from moejax.parallel.rules import load_layout

    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows {args.max_windows} must be >= 1")
    layout = load_layout(args.layout)
    meta, _ = checkpoint.read_meta(args.ckpt)
    checkpoint.refuse_quantized(meta, args.ckpt, "eval.py (give it the float checkpoint and --quant int8)")
    cfg = checkpoint.serving_config(args.ckpt, args.config)  # a --config beside --ckpt must match it
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} must be in [2, {cfg.max_seq_len}] (the model's max_seq_len)")
    text = data.split(data.read_tokens(args.data, flags.tokenizer(args, cfg)), args.split)
    data.check_windows(text, args.seq_len, f"the {args.split} split of {args.data!r}")
    windows = data.consecutive_windows(text, args.seq_len, args.max_windows)
    mesh = make_mesh(shape)
    layout.validate(cfg, shape)
    if args.quant:
        if args.batch < 1:
            raise UserError(f"--batch {args.batch} must be >= 1")
        return compare_quant(args, cfg, layout, mesh, windows)
    import jax

    rs = flags.run_spec(args, cfg, layout, shape, batch=len(windows), platform=jax.default_backend(), training=True)
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

    from moejax.inference.compare import compare_weights
    from moejax.parallel.mesh import mesh_shape_of

    shape, platform = mesh_shape_of(mesh), jax.default_backend()
    batch = min(args.batch, len(windows))
    specs = [flags.run_spec(args, cfg, layout, shape, batch=batch, platform=platform, quant=q) for q in (None, args.quant)]
    report = {"ckpt": args.ckpt, "split": args.split, **compare_weights(args.ckpt, specs[0], specs[1], mesh, windows, batch)}
    form, diff, peak = report["quant_matmul"], report["logits_max_abs_diff"], report["logits_max_abs"]
    print(f"{args.ckpt}: {len(windows)} windows of {args.seq_len} bytes ({args.split} split), {args.dtype}: "
          f"cross-entropy {report['ce_loss_float']:.4f} float, {report['ce_loss_quant']:.4f} {args.quant} "
          f"({form} matmuls), change {report['ce_loss_change']:+.4f} nats/byte; logits |diff| mean "
          f"{report['logits_mean_abs_diff']:.3g}, max {diff:.3g} (of max |logit| {peak:.3g}); same next byte at "
          f"{report['next_token_agreement']:.2%} of positions")
    print(json.dumps(report))
    return report


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
