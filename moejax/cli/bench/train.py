"""The training-step benchmark: step time, tokens/s and MFU per mesh, side by side in one process.

    python scripts/bench_train.py --config configs/shakespeare.yaml --mesh 1x1x1x1 --mesh 1x2x2x2 \\
        --batch 16 --seq-len 64 --json results/cpu-train-shakespeare.json
    python scripts/bench_train.py --config seed --batch 4 --seq-len 128 --steps 3   # MFU of a seed step

Meshes are timed in alternation, one step each per round after warm-up steps (this machine's speed
drifts); each round also samples the matmul roof on the mesh's devices. MFU = training FLOPs (3 x
the forward's: 2 x active parameters per token plus attention) / step time / matmul roof. Every
mesh starts from the same weights and trains on the same batches.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes
from moejax.cli import flags
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices
from moejax.models import counts


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_model(ap, config_default="configs/shakespeare.yaml", ckpt=False)
    flags.add_mesh(ap, repeat=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mesh")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (routing settles a little)")
    flags.add_dtype(ap, default="bfloat16", help="compute dtype (default bfloat16; master parameters stay float32)")
    flags.add_moe(ap)
    ap.add_argument("--remat", action="store_true")
    flags.add_json(ap, to_file=True)
    return ap.parse_args(argv)


def run(args) -> dict:
    meshes = args.mesh or ["1x1x1x1"]
    shapes = [parse_mesh(m) for m in meshes]
    for name, v in (("--batch", args.batch), ("--seq-len", args.seq_len), ("--steps", args.steps)):
        if v < 1:
            raise UserError(f"{name} {v} must be >= 1")
    provision_host_devices(max(s.size for s in shapes))
    import jax

    from moejax.training import data
    from moejax.models import transformer as model
    from moejax.training import trainer as train
    from moejax.config.model import load_config
    from moejax.parallel.mesh import make_mesh
    from moejax.bench.roofline import Rooflines
    from moejax.parallel.rules import load_layout

    cfg = load_config(args.config)
    layout = load_layout(args.layout)
    text = data.read_bytes(data.SHAKESPEARE)
    if cfg.vocab_size < 256:
        raise UserError(f"config {cfg.name}: vocab_size {cfg.vocab_size} < 256 cannot take byte-level text")
    flops_per_token = 3 * counts.flops_per_token_prefill(cfg, args.seq_len)
    runs = []
    for text_mesh, shape in zip(meshes, shapes):
        mesh = make_mesh(shape)
        rs = flags.run_spec(args, cfg, layout, shape, batch=args.batch, platform=jax.default_backend(),
                            dtype=args.dtype, training=True)
        t0 = time.perf_counter()
        tr = train.Trainer(rs, mesh, train.Hyper(steps=1000, lr=1e-3), args.batch, args.seq_len)
        compile_s = time.perf_counter() - t0
        params = model.init_params(cfg, 0, "float32", mesh, layout)
        runs.append({"mesh": text_mesh, "shape": shape, "trainer": tr, "params": params,
                     "opt": tr.init_opt(params), "compile_s": compile_s, "times": [],
                     "roof": Rooflines(mesh, args.dtype), "mem": tr.bytes_per_device()})
        print(f"{text_mesh}: compiled the train step in {compile_s:.1f} s", file=sys.stderr)

    def one_step(r, i):
        tokens = data.random_windows(text, args.batch, args.seq_len, 0, i)
        t0 = time.perf_counter()
        r["params"], r["opt"], metrics = r["trainer"].step(r["params"], r["opt"], tokens)
        loss = float(metrics["loss"])  # waits for the step
        return time.perf_counter() - t0, loss

    for i in range(args.warmup_steps):
        for r in runs:
            one_step(r, i)
    for i in range(args.steps):
        for r in runs:
            dt, loss = one_step(r, args.warmup_steps + i)
            r["times"].append(dt)
            r["last_loss"] = loss
            r["roof"].sample()
        print(f"\rtimed step {i + 1}/{args.steps}", end="\n" if i + 1 == args.steps else "", file=sys.stderr)
    tokens = args.batch * args.seq_len
    results = []
    for r in runs:
        step_s = statistics.median(r["times"])
        roof = r["roof"].result()["matmul_flops_per_s"]
        results.append({"mesh": r["mesh"], "devices": r["shape"].size, "step_s": step_s,
                        "tokens_per_s": tokens / step_s, "flops_per_token": flops_per_token,
                        "matmul_roofline_flops_per_s": roof, "mfu": flops_per_token * tokens / step_s / roof,
                        "compile_s": r["compile_s"], "last_loss": r["last_loss"], **r["mem"]})
    base = results[0]["step_s"]
    for res in results:
        res["step_over_first_mesh"] = res["step_s"] / base
    report = {"config": cfg.name, "params_total": counts.param_count(cfg), "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "steps": args.steps, "remat": args.remat, "policy": runs[0]["trainer"].rs.policy,
              "backend": jax.default_backend(), "peak_rss_gb": peak_rss_bytes() / 1e9, "meshes": results}
    print(f"config {cfg.name} ({counts.param_count(cfg):,} parameters), {args.dtype}, batch {args.batch} x {args.seq_len}, "
          f"median of {args.steps} steps")
    print(f"{'mesh':>9} {'step ms':>9} {'tokens/s':>10} {'x first':>8} {'MFU':>6} {'roof GFLOP/s':>13} "
          f"{'temp GB/dev':>12}")
    for res in results:
        temp = res["step_temp_bytes_per_device"]
        print(f"{res['mesh']:>9} {res['step_s'] * 1e3:9.1f} {res['tokens_per_s']:10,.0f} "
              f"{res['step_over_first_mesh']:8.2f} {res['mfu']:6.3f} {res['matmul_roofline_flops_per_s'] / 1e9:13.0f} "
              f"{(temp or 0) / 1e9:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return report


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
