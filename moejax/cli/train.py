"""Train the MoE model on a (dp, pp, tp, ep) mesh with the serving program's pieces.

    python scripts/train.py --config configs/shakespeare.yaml      # the demo: defaults from the config
    python scripts/train.py --mesh 1x2x2x2 --config tiny --data data/tinyshakespeare.txt --steps 50 \\
        --batch 8 --seq-len 64 --lr 1e-3 --out runs/tiny
    python scripts/train.py --config configs/shakespeare.yaml --resume   # continue the latest state

Flags left out come from the config file's `train:` section, then from the defaults below.
Writes OUT/state (train states: parameters, optimizer, step; the last two kept), OUT/model (the
final parameters as a moejax checkpoint for infer.py, eval.py, reshard.py, export_hf.py) and
OUT/log.jsonl (one JSON object per step). The last stdout line is a JSON summary.
"""

from __future__ import annotations

import time

T0 = time.time()  # wall_s counts from here: imports, compilation and evaluation included

import json
import os
import sys


from moejax.cli.common import ArgumentParser, use_compile_cache, guarded, peak_rss_bytes
from moejax.cli import flags
from moejax.config.model import load_train_defaults
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices
from moejax.models import counts

DEMO_CONFIG = "configs/shakespeare.yaml"  # the config without --config or --init-ckpt
DEFAULTS = {  # used where neither a flag nor the config's train: section sets a value
    "mesh": "1x1x1x1", "layout": "meshes/seed.yaml", "data": None, "steps": 1000, "batch": 16, "seq_len": 128,
    "lr": 1e-3, "out": None, "save_every": 0, "eval_every": 0, "eval_windows": 64, "warmup": 100,
    "weight_decay": 0.1, "clip": 1.0, "b1": 0.9, "b2": 0.99, "min_lr_ratio": 0.1, "z_loss_coef": 0.0, "balance": "hf",
    "dtype": "bfloat16", "seed": 0, "microbatches": None, "capacity_policy": "dropless", "capacity_factor": None,
    "moe_kernel": "auto", "remat": False, "bias_update_rate": 0.0, "tokenizer": None,
}


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_model(ap, ckpt=False, default_help=f"{DEMO_CONFIG}, or the checkpoint's with --init-ckpt")
    flags.add_mesh(ap, default=None, layout_default=None)
    ap.add_argument("--data", help="text file: first 90%% of its tokens train, the last 10%% validate")
    flags.add_tokenizer(ap)
    ap.add_argument("--init-ckpt", help="start from this moejax checkpoint's parameters and config (a --config "
                                        "given beside it must match it)")
    ap.add_argument("--steps", type=int, help="total optimizer steps (a resumed run continues up to this)")
    ap.add_argument("--batch", type=int, help="sequences per step (a multiple of batch shards x microbatches)")
    ap.add_argument("--seq-len", type=int, help="tokens per training window")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--out", help="run directory (default runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT's latest complete train state")
    ap.add_argument("--json-log", help="one JSON object per step (default OUT/log.jsonl)")
    ap.add_argument("--save-every", type=int, help="save a train state every K steps (0: only at the end)")
    ap.add_argument("--eval-every", type=int, help="validation loss every K steps (0: only at the end)")
    ap.add_argument("--eval-windows", type=int, help="validation windows, evenly spaced over the split")
    ap.add_argument("--warmup", type=int, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, help="AdamW weight decay (not applied to norms)")
    ap.add_argument("--clip", type=float, help="clip gradients to this global norm")
    ap.add_argument("--b1", type=float, help="Adam beta1")
    ap.add_argument("--b2", type=float, help="Adam beta2")
    ap.add_argument("--min-lr-ratio", type=float, help="the cosine ends at lr x this")
    ap.add_argument("--z-loss-coef", type=float, help="router z-loss coefficient (0: off)")
    ap.add_argument("--balance", choices=("hf", "per-layer"),
                    help="load-balancing loss: HF Mixtral's (all layers' rows together; default) or each "
                         "layer's own, averaged (both are logged)")
    ap.add_argument("--bias-update-rate", type=float, metavar="G",
                    help="auxiliary-loss-free balancing (DeepSeek-V3) for routers with a correction bias: after "
                         "each step, router_bias[layer, e] += G x sign(mean load - load of e) (0: off; "
                         "DeepSeek-V3: 0.001)")
    flags.add_dtype(ap, help="compute dtype (default bfloat16; master parameters stay float32)")
    ap.add_argument("--remat", action="store_true", default=None, help="recompute layer activations in backward")
    ap.add_argument("--seed", type=int, help="seed for initial weights and data windows")
    flags.add_moe(ap)
    flags.add_json(ap, help="(accepted for symmetry: the last line is always JSON)")
    return ap.parse_args(argv)


def fill_defaults(args):
    """Flags left out take the config file's train: values, then DEFAULTS. A checkpoint's config
    (--init-ckpt without --config) has no train: section."""
    if args.config is None and args.init_ckpt is None:
        args.config = DEMO_CONFIG
    given = load_train_defaults(args.config) if args.config else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(f"config {args.config}: train: unknown key {unknown[0]!r}; valid: {', '.join(DEFAULTS)}")
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, given.get(key, default))
    return args


def run(args) -> dict:
    fill_defaults(args)
    shape = parse_mesh(args.mesh)
    provision_host_devices(shape.size)
    import jax
    import numpy as np
    from tqdm import tqdm

    from moejax.checkpoint import store as checkpoint
    from moejax.tokenizers import CKPT_SUBDIR, copy_tokenizer_files
    from moejax.training import data
    from moejax.training import trainer as train
    from moejax.training.loop import fit
    from moejax.parallel.mesh import make_mesh
    from moejax.parallel.rules import load_layout

    use_compile_cache()

    cfg = checkpoint.serving_config(args.init_ckpt, args.config)
    train.check_bias_rate(cfg, args.bias_update_rate)
    layout = load_layout(args.layout)
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} must be in [2, {cfg.max_seq_len}] (the config's max_seq_len)")
    if args.batch < 1 or args.eval_windows < 1 or args.save_every < 0 or args.eval_every < 0:
        raise UserError("--batch and --eval-windows must be >= 1, --save-every and --eval-every >= 0")
    if not args.data:
        raise UserError("no --data FILE given (and the config's train: section names none)")
    tok = flags.tokenizer(args, cfg, args.init_ckpt)
    text = data.read_tokens(args.data, tok)
    unit = "byte" if tok.kind == "bytes" else "token"
    train_split, val_split = data.split(text, "train"), data.split(text, "val")
    data.check_windows(train_split, args.seq_len, f"the training split of {args.data!r} (first 90%)")
    data.check_windows(val_split, args.seq_len, f"the validation split of {args.data!r} (last 10%)")
    out = args.out or os.path.join("runs", cfg.name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} exists and is not a directory")
    state_dir, model_dir = os.path.join(out, "state"), os.path.join(out, "model")
    log_path = args.json_log or os.path.join(out, "log.jsonl")
    have = train.latest_state_step(state_dir)
    if have is not None and not args.resume:
        raise UserError(f"--out {out!r} already holds a training run (step {have}); pass --resume to continue it, "
                        f"or choose another --out")
    if args.resume and have is None:
        raise UserError(f"--resume: {state_dir!r} holds no complete train state")
    rs = flags.run_spec(args, cfg, layout, shape, batch=args.batch, platform=jax.default_backend(),
                        dtype=args.dtype, training=True)
    micro = rs.microbatches
    hyper = train.Hyper(steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                        clip=args.clip, b1=args.b1, b2=args.b2, min_lr_ratio=args.min_lr_ratio,
                        z_coef=args.z_loss_coef, balance=args.balance, bias_rate=args.bias_update_rate)
    mesh = make_mesh(shape)
    rs, _ = flags.measured_kernel(rs, mesh, (args.batch * args.seq_len,))
    t = time.time()
    trainer = train.Trainer(rs, mesh, hyper, args.batch, args.seq_len)
    compile_s = time.time() - t
    if args.resume:
        start, params, opt_state, _ = train.restore_state(state_dir, trainer)
    else:
        start = 0
        params = train.init_or_load(rs, mesh, args.seed, args.init_ckpt)
        opt_state = trainer.init_opt(params)
    os.makedirs(out, exist_ok=True)
    mem = trainer.bytes_per_device()
    gb = lambda b: f"{b / 1e9:.3f} GB" if b is not None else "n/a"
    print(f"config {cfg.name}: {counts.param_count(cfg):,} parameters; mesh {shape} ({shape.size} devices), layout "
          f"{layout.name}, compute {args.dtype}, MoE kernel {rs.kernel}, policy {args.capacity_policy}, "
          f"{micro} microbatch(es){', remat' if args.remat else ''}"
          f"{f', correction bias balanced at rate {args.bias_update_rate:g}' if args.bias_update_rate else ''}")
    print(f"per device: master parameters {gb(mem['param_bytes_per_device'])} (float32), optimizer state "
          f"{gb(mem['optimizer_bytes_per_device'])} (Adam moments, ZeRO-1 over dp={shape.dp}), step temporaries "
          f"{gb(mem['step_temp_bytes_per_device'])}")
    print(f"data {args.data}: {len(train_split):,} train / {len(val_split):,} validation {unit}s "
          f"({tok.source or 'bytes'}); batch {args.batch} x "
          f"{args.seq_len} = {args.batch * args.seq_len:,} tokens a step; steps {start + 1}..{args.steps}; "
          f"compiled in {compile_s:.1f} s")
    val = data.spaced_windows(val_split, args.eval_windows, args.seq_len)
    meta_extra = {"data": os.path.abspath(args.data), "batch": args.batch, "seq_len": args.seq_len,
                  "tokenizer": tok.source}
    bar = tqdm(total=args.steps, initial=start, file=sys.stderr, unit="step", mininterval=1.0, dynamic_ncols=True)

    def show(step: int, record: dict) -> None:
        bar.set_postfix_str(f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s" +
                            (f" | val {record['val_loss']:.4f}" if "val_loss" in record else "") +
                            (f" | bias {record['bias_min']:+.3f}..{record['bias_max']:+.3f}"
                             if "bias_max" in record else ""), refresh=False)
        bar.update(1)

    try:
        params, opt_state, record, rates = fit(
            trainer, params, opt_state, train_split, val, start=start, steps=args.steps, seed=args.seed,
            eval_every=args.eval_every, save_every=args.save_every, log_path=log_path, state_dir=state_dir,
            state_meta=lambda step: train.state_meta(rs, args.mesh, step, args.seed, hyper, meta_extra),
            saved=start if args.resume else None, t0=T0, on_step=show)
    finally:
        bar.close()
    if start < args.steps:
        checkpoint.save(model_dir, params, cfg, layout, "float32", args.mesh)
        copy_tokenizer_files(tok.source, os.path.join(model_dir, CKPT_SUBDIR))  # serve and export find it there
    summary = {"final_train_loss": record.get("loss"), "final_val_loss": record.get("val_loss"),
               "val_max_load_ratio": record.get("val_max_load_ratio"),
               "val_load_ratio_per_layer": record.get("val_load_ratio_per_layer"),
               **({"bias_update_rate": args.bias_update_rate, "bias_min": record.get("bias_min"),
                   "bias_max": record.get("bias_max")} if "bias_min" in record else {}), "steps": args.steps,
               "wall_s": round(time.time() - T0, 2), "compile_s": round(compile_s, 2),
               "tokens_per_s_median": float(np.median(rates)) if rates else None,
               "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3), **mem, "out": out, "model": model_dir}
    if record:
        print(f"step {args.steps}: train loss {record['loss']:.4f}, validation loss {record.get('val_loss', 0):.4f} "
              f"nats/{unit}, {summary['tokens_per_s_median']:,.0f} tokens/s (median), {summary['wall_s']:.1f} s, "
              f"model in {model_dir}")
    else:
        print(f"nothing to do: {out} is already at step {start} of {args.steps}")
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
