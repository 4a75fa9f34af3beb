#!/usr/bin/env python
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

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, use_compile_cache, guarded, limit_malloc_arenas, peak_rss_bytes  # noqa: E402
from moejax.config import DTYPES, KERNELS, POLICIES, load_config, load_train_defaults  # noqa: E402
from moejax.errors import UserError  # noqa: E402
from moejax.mesh import parse_mesh, provision_host_devices  # noqa: E402

DEFAULTS = {  # used where neither a flag nor the config's train: section sets a value
    "mesh": "1x1x1x1", "layout": "meshes/seed.yaml", "data": None, "steps": 1000, "batch": 16, "seq_len": 128,
    "lr": 1e-3, "out": None, "save_every": 0, "eval_every": 0, "eval_windows": 64, "warmup": 100,
    "weight_decay": 0.1, "clip": 1.0, "b1": 0.9, "b2": 0.99, "min_lr_ratio": 0.1, "z_loss_coef": 0.0, "balance": "hf",
    "dtype": "bfloat16", "seed": 0, "microbatches": None, "capacity_policy": "dropless", "capacity_factor": None,
    "moe_kernel": "auto", "remat": False,
}


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", default="configs/shakespeare.yaml", help="model config (file or name in configs/)")
    ap.add_argument("--mesh", help="DPxPPxTPxEP (default 1x1x1x1)")
    ap.add_argument("--layout", help="sharding rules (file or name in meshes/)")
    ap.add_argument("--data", help="byte-level text file: first 90%% trains, last 10%% validates")
    ap.add_argument("--init-ckpt", help="start from this moejax checkpoint's parameters (same config)")
    ap.add_argument("--steps", type=int, help="total optimizer steps (a resumed run continues up to this)")
    ap.add_argument("--batch", type=int, help="sequences per step (a multiple of batch shards x microbatches)")
    ap.add_argument("--seq-len", type=int, help="bytes per training window")
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
    ap.add_argument("--dtype", choices=DTYPES, help="compute dtype (master parameters stay float32)")
    ap.add_argument("--remat", action="store_true", default=None, help="recompute layer activations in backward")
    ap.add_argument("--seed", type=int, help="seed for initial weights and data windows")
    ap.add_argument("--microbatches", type=int, help="pipeline microbatches M (default: as infer.py)")
    ap.add_argument("--capacity-policy", choices=POLICIES)
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--moe-kernel", choices=KERNELS, help="auto = batched when training")
    ap.add_argument("--json", action="store_true", help="(accepted for symmetry: the last line is always JSON)")
    return ap.parse_args(argv)


def fill_defaults(args):
    """Flags left out take the config's train: values, then DEFAULTS."""
    given = load_train_defaults(args.config)
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

    from moejax import checkpoint, data, model, train
    from moejax.mesh import make_mesh
    from moejax.pipeline import default_microbatches
    from moejax.rules import load_layout

    use_compile_cache()

    cfg = load_config(args.config)
    layout = load_layout(args.layout)
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} must be in [2, {cfg.max_seq_len}] (the config's max_seq_len)")
    if args.batch < 1 or args.eval_windows < 1 or args.save_every < 0 or args.eval_every < 0:
        raise UserError("--batch and --eval-windows must be >= 1, --save-every and --eval-every >= 0")
    if not args.data:
        raise UserError("no --data FILE given (and the config's train: section names none)")
    text = data.read_bytes(args.data)
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
    micro = args.microbatches or default_microbatches(shape.pp, args.batch, layout.shards("batch", shape))
    rs = model.RunSpec(cfg, layout, shape, args.dtype, args.capacity_policy,
                       args.capacity_factor or (2.0 if args.capacity_policy == "dropless" else 1.25), micro,
                       args.moe_kernel, training=True, remat=bool(args.remat))
    hyper = train.Hyper(steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                        clip=args.clip, b1=args.b1, b2=args.b2, min_lr_ratio=args.min_lr_ratio,
                        z_coef=args.z_loss_coef, balance=args.balance)
    mesh = make_mesh(shape)
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
    print(f"config {cfg.name}: {cfg.param_count():,} parameters; mesh {shape} ({shape.size} devices), layout "
          f"{layout.name}, compute {args.dtype}, MoE kernel {rs.kernel}, policy {args.capacity_policy}, "
          f"{micro} microbatch(es){', remat' if args.remat else ''}")
    print(f"per device: master parameters {gb(mem['param_bytes_per_device'])} (float32), optimizer state "
          f"{gb(mem['optimizer_bytes_per_device'])} (Adam moments, ZeRO-1 over dp={shape.dp}), step temporaries "
          f"{gb(mem['step_temp_bytes_per_device'])}")
    print(f"data {args.data}: {len(train_split):,} train / {len(val_split):,} validation bytes; batch {args.batch} x "
          f"{args.seq_len} = {args.batch * args.seq_len:,} tokens a step; steps {start + 1}..{args.steps}; "
          f"compiled in {compile_s:.1f} s")
    val = data.spaced_windows(val_split, args.eval_windows, args.seq_len)
    meta_extra = {"data": os.path.abspath(args.data), "batch": args.batch, "seq_len": args.seq_len}
    record, val_metrics, last_saved, rates = {}, None, start if args.resume else None, []
    bar = tqdm(total=args.steps, initial=start, file=sys.stderr, unit="step", mininterval=1.0, dynamic_ncols=True)
    tick = time.time()
    for step in range(start + 1, args.steps + 1):
        tokens = data.random_windows(train_split, args.batch, args.seq_len, args.seed, step)
        params, opt_state, metrics = trainer.step(params, opt_state, tokens)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = args.batch * args.seq_len / (now - tick)
        tick = now
        rates.append(rate)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            bar.close()
            kept = f"step {last_saved} in {state_dir}" if last_saved is not None else "none was saved"
            raise UserError(f"step {step}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} is not "
                            f"finite; training stopped and nothing from this step on was saved (last checkpoint: {kept}); "
                            f"try a lower --lr (now {args.lr})")
        record = {"step": step, **{k: metrics[k] for k in ("loss", "ce_loss", "aux_loss", "aux_loss_per_layer",
                                                             "z_loss", "grad_norm", "max_load_ratio")},
                  "lr": float(train.learning_rate(hyper)(step - 1)), "tokens_per_s": rate}
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            val_metrics = trainer.evaluate(params, val)
            record["val_loss"] = val_metrics["ce_loss"]
            record["val_max_load_ratio"] = val_metrics["max_load_ratio"]
            tick = time.time()  # evaluation time does not count against the step rate
        record["wall_s"] = time.time() - T0
        train.append_jsonl(log_path, record)
        bar.set_postfix_str(f"loss {metrics['loss']:.4f} | {rate:,.0f} tok/s" +
                            (f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""), refresh=False)
        bar.update(1)
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            train.save_state(state_dir, step, params, opt_state,
                             train.state_meta(rs, args.mesh, step, args.seed, hyper, meta_extra))
            last_saved = step
            tick = time.time()
    bar.close()
    if start < args.steps:
        checkpoint.save(model_dir, params, cfg, layout, "float32", args.mesh)
    summary = {"final_train_loss": record.get("loss"), "final_val_loss": record.get("val_loss"),
               "val_max_load_ratio": record.get("val_max_load_ratio"), "steps": args.steps,
               "wall_s": round(time.time() - T0, 2), "compile_s": round(compile_s, 2),
               "tokens_per_s_median": float(np.median(rates)) if rates else None,
               "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3), **mem, "out": out, "model": model_dir}
    if record:
        print(f"step {args.steps}: train loss {record['loss']:.4f}, validation loss {record.get('val_loss', 0):.4f} "
              f"nats/byte, {summary['tokens_per_s_median']:,.0f} tokens/s (median), {summary['wall_s']:.1f} s, "
              f"model in {model_dir}")
    else:
        print(f"nothing to do: {out} is already at step {start} of {args.steps}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    limit_malloc_arenas()
    sys.exit(guarded(run, parse_args(sys.argv[1:])))
