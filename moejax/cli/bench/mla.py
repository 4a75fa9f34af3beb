"""Multi-head latent attention's cache and decode, side by side with the expanded form (issue 28).

    python -m moejax bench mla [--config configs/deepseek-v3-tiny.yaml --config configs/deepseek-v3-mid.yaml]
        [--batch 4] [--context 1024] [--steps 16] [--rounds 3] [--plan-config configs/deepseek-v3.yaml]
        [--plan-mesh 1x1x1x128 ...] [--gpu-gb 141] [--plan-context 131072] [--json FILE]

1. Bytes: the cache per token and layer of --plan-config, latent (kv_lora_rank + qk_rope_head_dim, replicated
   over tp) against the expanded keys and values of the same model (heads x (qk head + v head), split
   over tp), and on --plan-mesh with --gpu-gb per GPU: the weights each GPU holds (the placement report)
   and how many --plan-context-long slots the memory left after the weights holds, per form (activations
   and the runtime are not counted: an upper bound).
2. Decode: per --config (random weights, float32 on CPU), the median decode step at --context cached
   positions of --batch rows with the absorbed form and with the expanded form, alternating rounds in
   one process, and their ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from moejax.cli.common import ArgumentParser, guarded

DEFAULT_CONFIGS = ["configs/deepseek-v3-tiny.yaml", "configs/deepseek-v3-mid.yaml"]


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", action="append", help="DeepSeek-style configs to time (repeatable)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="cached positions each decode step attends to")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plan-config", default="configs/deepseek-v3.yaml")
    ap.add_argument("--plan-mesh", action="append", help="meshes the slots per GPU are counted on (repeatable; "
                    "default: 1x1x1x128, the planner's first for 128 H200s, and 1x1x8x16, where tp splits the "
                    "expanded cache 8 ways)")
    ap.add_argument("--plan-layout", default="seed")
    ap.add_argument("--gpu-gb", type=float, default=141.0, help="memory per GPU (H200: 141)")
    ap.add_argument("--plan-context", type=int, default=131072)
    ap.add_argument("--json")
    return ap.parse_args(argv)


def cache_bytes(args) -> dict:
    """Part 1, analytic: per token and layer, and slots per GPU at --plan-context on each --plan-mesh."""
    from moejax.config.model import load_config
    from moejax.models.cache import cache_values_per_token
    from moejax.models.placement import placement
    from moejax.parallel.mesh import parse_mesh
    from moejax.parallel.rules import load_layout

    cfg, lay = load_config(args.plan_config), load_layout(args.plan_layout)
    latent = cache_values_per_token(cfg)
    expanded = cfg.num_heads * (cfg.head_dim + cfg.v_head_dim)
    out = {"config": cfg.name, "values_per_token_layer": {"latent": latent, "expanded": expanded},
           "ratio": expanded / latent, "context": args.plan_context, "gpu_gb": args.gpu_gb, "meshes": []}
    for text in args.plan_mesh or ["1x1x1x128", "1x1x8x16"]:
        shape = parse_mesh(text)
        weights = placement(cfg, lay, shape, "bfloat16", 1, 1)["placement"]["param_bytes_per_device"]
        per_token = cfg.num_layers // shape.pp * 2  # bytes per value (bfloat16) x the layers a GPU holds
        per_slot = {"latent": latent * per_token * args.plan_context,  # replicated over tp
                    "expanded": expanded // lay.shards("heads", shape) * per_token * args.plan_context}
        free = args.gpu_gb * 1e9 - weights
        out["meshes"].append({"mesh": text, "weight_bytes_per_gpu": weights, "cache_bytes_per_slot_per_gpu": per_slot,
                              "slots_per_gpu": {k: max(int(free // v), 0) for k, v in per_slot.items()}})
    return out


def decode_times(path: str, args) -> dict:
    """Part 2: median decode step, absorbed and expanded, alternating rounds."""
    import dataclasses

    import jax
    import numpy as np

    from moejax.config.model import load_config
    from moejax.inference.generate import put
    from moejax.models import cache as kv_cache
    from moejax.models import transformer as model
    from moejax.models.runspec import RunSpec
    from moejax.parallel.mesh import make_mesh, parse_mesh
    from moejax.parallel.rules import load_layout

    cfg = load_config(path)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.context + args.steps))
    shape, lay = parse_mesh("1x1x1x1"), load_layout("seed")
    m = make_mesh(shape)
    stacked = model.init_params(cfg, 0, "float32", m, lay)
    b, ctx = args.batch, args.context
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, ctx)).astype(np.int32)
    forms = {}
    for absorb in (True, False):
        rs = RunSpec(cfg, lay, shape, "float32", mla_absorb=absorb, moe_kernel="batched")
        params = model.serving_params(dict(stacked), rs, m)
        cache = kv_cache.init_cache(rs, m, b, ctx + args.steps)
        _, cache, _ = model.build(rs, m, "prefill")(params, put(m, lay, "tokens", prompt),
                                                     put(m, lay, "lengths", np.full(b, ctx, np.int32)), cache)
        forms["absorbed" if absorb else "expanded"] = {"step": model.build(rs, m, "decode"), "params": params,
                                                       "cache": cache, "ms": []}
    tok = put(m, lay, "tokens", np.ones((b, 1), np.int32))
    for r in range(args.rounds + 1):  # round 0 compiles and warms up
        for f in forms.values():
            cache = f["cache"]
            t0 = time.perf_counter()
            for i in range(args.steps):
                pos = put(m, lay, "lengths", np.full(b, ctx + i, np.int32))
                logits, cache, _ = f["step"](f["params"], tok, pos, cache)
            jax.block_until_ready(logits)
            f["cache"] = cache
            if r:
                f["ms"].append((time.perf_counter() - t0) / args.steps * 1e3)
    out = {k: statistics.median(f["ms"]) for k, f in forms.items()}
    return {"config": cfg.name, "batch": b, "context": ctx, "rounds_ms": {k: f["ms"] for k, f in forms.items()},
            "median_step_ms": out, "expanded_over_absorbed": out["expanded"] / out["absorbed"]}


def run(args) -> int:
    import jax

    res = {"machine": f"{jax.default_backend()}, jax {jax.__version__}", "cache": cache_bytes(args), "decode": []}
    c = res["cache"]
    print(f"{c['config']}: cache per token per layer {c['values_per_token_layer']['latent']} values (latent) vs "
          f"{c['values_per_token_layer']['expanded']} (expanded): {c['ratio']:.1f}x")
    for mc in c["meshes"]:
        print(f"  {mc['mesh']}, {c['gpu_gb']:.0f} GB per GPU, {mc['weight_bytes_per_gpu'] / 1e9:.1f} GB of weights: "
              f"slots of {c['context']} tokens per GPU: {mc['slots_per_gpu']['latent']} latent, "
              f"{mc['slots_per_gpu']['expanded']} expanded")
    for path in args.config or DEFAULT_CONFIGS:
        d = decode_times(path, args)
        res["decode"].append(d)
        ms = d["median_step_ms"]
        print(f"{d['config']}: decode step at {d['context']} positions x {d['batch']} rows: absorbed "
              f"{ms['absorbed']:.2f} ms, expanded {ms['expanded']:.2f} ms ({d['expanded_over_absorbed']:.2f}x)",
              file=sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv=None) -> int:
    return guarded(run, parse_args(argv if argv is not None else sys.argv[1:]))
