"""Benchmark the MoE layer alone: one device against several simulated devices, in one run.

    python scripts/bench_moe.py [--config seed] [--tokens 1024] [--mesh 1x1x2x4 --mesh 1x1x1x8]
                                [--dtype bfloat16] [--repeats 5] [--json FILE]

Reports per mesh: median wall time, its ratio to 1x1x1x1 (runs alternate, so drift hits both), the
expert rows computed and exchanged against the top-k work (N x k), and the collectives in the HLO.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


from moejax.cli.common import ArgumentParser
from moejax.cli import flags
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_model(ap, config_default="seed", ckpt=False)
    flags.add_mesh(ap, default="1x1x2x4, 1x1x1x8; each is compared with 1x1x1x1", repeat=True)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens in the layer (default 8 x 128)")
    flags.add_dtype(ap, default="bfloat16", help="compute dtype (default bfloat16)")
    flags.add_moe(ap)
    ap.add_argument("--repeats", type=int, default=5)
    flags.add_json(ap, to_file=True)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meshes = ["1x1x1x1"] + (args.mesh or ["1x1x2x4", "1x1x1x8"])
        shapes = [parse_mesh(m) for m in meshes]
        provision_host_devices(max(s.size for s in shapes))
        results = run(args, meshes, shapes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| mesh | devices | median ms | ratio to 1 device | computed rows / top-k rows | exchanged rows / top-k "
          "rows | all-to-all | all-gather |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mesh']} | {r['devices']} | {r['median_ms']:.1f} | {r['ratio_to_1_device']:.2f} | "
              f"{r['computed_over_topk']:.3f} | {r['exchanged_over_topk']:.3f} | {r['hlo']['all-to-all']} | "
              f"{r['hlo']['all-gather']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "tokens": args.tokens, "dtype": args.dtype, "results": results}, f,
                      indent=1)
    return 0


def run(args, meshes, shapes):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moejax.config.model import load_config
    from moejax.parallel.mesh import make_mesh
    from moejax.ops.moe.dispatch import moe_block
    from moejax.parallel.rules import load_layout

    cfg = load_config(args.config)
    lay = load_layout(args.layout)
    rng = np.random.default_rng(0)
    D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn
    host = {"moe_norm": np.ones(D, np.float32), "router": 0.02 * rng.standard_normal((D, E), np.float32),
            **{n: 0.02 * rng.standard_normal((E, D, F) if n != "w2" else (E, F, D), np.float32)
               for n in ("w1", "w3", "w2")}}
    x_host = rng.standard_normal((args.tokens, D), np.float32)
    programs = []
    for text, shape in zip(meshes, shapes):
        rs = flags.run_spec(args, cfg, lay, shape, batch=1, platform=jax.default_backend())
        if rs.kernel != "buffers":
            raise UserError(f"bench moe times the buffers kernel (per-expert weights); --moe-kernel {rs.kernel} "
                            f"is timed by bench model")
        mesh = make_mesh(shape)
        spec = rs.moe_spec()
        shards, e_loc = spec.expert_shards, E // spec.expert_shards
        ex_spec = lay.spec(("experts", None, "expert_ffn"))
        ex_spec_w2 = lay.spec(("experts", "expert_ffn", None))
        w = {"moe_norm": jax.device_put(host["moe_norm"].astype(args.dtype), NamedSharding(mesh, P())),
             "router": jax.device_put(host["router"].astype(args.dtype), NamedSharding(mesh, P()))}
        w_specs = {"moe_norm": P(), "router": P()}
        for n in ("w1", "w3", "w2"):
            full = host[n].astype(args.dtype).reshape((shards, e_loc) + host[n].shape[1:])
            sp = ex_spec_w2 if n == "w2" else ex_spec
            w[n] = [jax.device_put(full[:, j], NamedSharding(mesh, sp)) for j in range(e_loc)]
            w_specs[n] = [sp] * e_loc
        tok_axes = lay.token_axes()
        tok_spec = P(tok_axes if tok_axes else None)
        x = jax.device_put(x_host.astype(args.dtype), NamedSharding(mesh, tok_spec))
        valid = jax.device_put(np.ones(args.tokens, bool), NamedSharding(mesh, tok_spec))
        psum_axes = lay.token_axes()

        def body(x, v, w, spec=spec, psum_axes=psum_axes):
            w = {n: [a.reshape(a.shape[1:]) for a in v] if isinstance(v, list) else v for n, v in w.items()}
            y, st = moe_block(x, v, w, spec, cfg.rms_norm_eps)
            return y, {k: jax.lax.psum(val, psum_axes) for k, val in st.items()}

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, w_specs),
                                  out_specs=(tok_spec, P()), check_vma=False))
        compiled = f.lower(x, valid, w).compile()
        hlo = compiled.as_text()
        counts = {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in
                  ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")}
        y, stats = compiled(x, valid, w)
        jax.block_until_ready(y)
        programs.append((text, shape, compiled, (x, valid, w), stats, counts))
        print(f"compiled {text}", file=sys.stderr)

    times = {p[0]: [] for p in programs}
    for i in range(args.repeats):
        for text, _, compiled, a, _, _ in programs:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*a))
            times[text].append(time.perf_counter() - t0)
        print(f"\rrepeat {i + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    base = statistics.median(times["1x1x1x1"])
    topk = args.tokens * cfg.experts_per_token
    out = []
    for text, shape, _, _, stats, counts in programs:
        med = statistics.median(times[text])
        out.append({"mesh": text, "devices": shape.size, "median_ms": med * 1e3, "ratio_to_1_device": med / base,
                    "computed_over_topk": int(stats["computed_rows"]) / topk,
                    "exchanged_over_topk": int(stats["exchanged_rows"]) / topk,
                    "dropped": int(stats["dropped"]), "hlo": counts, "times_ms": [t * 1e3 for t in times[text]]})
    return out
