"""The exact-row expert matmul on its own: each grouped-GEMM implementation against the padded
batched one the `batched` kernel runs, on one MoE layer's rows with a router's uneven group sizes.

    python scripts/bench_grouped.py [--config seed-10b] [--tokens 8192] [--dtype bfloat16]
        [--impl xla --impl mgpu --impl tokamax] [--mgpu-blocks 128,128,64,4,1 ...] [--json FILE]

Rows: --tokens tokens x top-k, routed by a random router (normal weights, std 0.02, over normal
activations), sorted by expert as the ragged kernel sends them. `padded` is what the batched kernel
computes: every expert's buffer as long as the fullest queue. Each implementation is first checked
against a float32 per-group matmul (max |diff| over max |want|), then timed (median of --repeats),
with its useful TFLOP/s (top-k rows only), whether the compiled HLO calls cuDNN, and on GPU the
cuDNN version. An implementation that fails to compile or run is reported with its error, not
skipped silently.
"""

from __future__ import annotations

import json
import os
import statistics
import time


from moejax.cli.common import ArgumentParser, guarded
from moejax.config.model import DTYPES
from moejax.errors import UserError


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", default="seed-10b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--impl", action="append", choices=("xla", "mgpu", "tokamax"),
                    help="grouped GEMMs to time besides `padded` (default: all three)")
    ap.add_argument("--mgpu-blocks", action="append",
                    help="block_m,block_n,block_k,max_concurrent_steps,grid_block_n (repeat to sweep)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the results to this file")
    return ap.parse_args(argv)


def cudnn_version():
    try:
        from jax._src.lib import cuda_versions
        return cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # the module moves between jax versions
        return f"unknown ({type(e).__name__})"


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax.ops.moe import dispatch as moe
    from moejax.ops.moe import ragged as moe_ragged
    from moejax.config.model import load_config

    if args.tokens < 1 or args.repeats < 1:
        raise UserError(f"--tokens {args.tokens} and --repeats {args.repeats} must be >= 1")
    cfg = load_config(args.config)
    E, k, D, F = cfg.num_experts, cfg.experts_per_token, cfg.d_model, cfg.expert_ffn
    key = jax.random.key(0)
    h = jax.random.normal(key, (args.tokens, D), jnp.float32)
    router = 0.02 * jax.random.normal(jax.random.fold_in(key, 1), (D, E), jnp.float32)
    _, experts, _ = moe.route(h, router, k)
    group = jnp.zeros((E,), jnp.int32).at[experts.reshape(-1)].add(1)
    rows = args.tokens * k
    x = jax.random.normal(jax.random.fold_in(key, 2), (rows, D), args.dtype)
    w = (0.02 * jax.random.normal(jax.random.fold_in(key, 3), (E, D, F), jnp.float32)).astype(args.dtype)
    starts = np.concatenate([[0], np.cumsum(np.asarray(group))[:-1]])
    want = np.concatenate([np.asarray(x[s:s + n], np.float32) @ np.asarray(w[e], np.float32)
                           for e, (s, n) in enumerate(zip(starts, np.asarray(group)))])
    fullest = int(group.max())

    def padded(x, w, group):  # the batched kernel's work: E buffers of the fullest queue's length
        idx = jnp.minimum(jnp.arange(fullest)[None, :] + jnp.asarray(starts)[:, None], rows - 1)
        y = jnp.einsum("erd,edf->erf", x[idx], w, preferred_element_type=jnp.float32)
        keep = jnp.arange(fullest)[None, :] < group[:, None]
        return jnp.zeros((rows, F), jnp.float32).at[jnp.where(keep, idx, rows)].set(y, mode="drop")

    cases = [("padded", None, padded)]
    for impl in args.impl or ["xla", "mgpu", "tokamax"]:
        sweep = args.mgpu_blocks if impl == "mgpu" and args.mgpu_blocks else [None]
        for blocks in sweep:
            def f(x, w, group, impl=impl, blocks=blocks):
                if blocks:
                    os.environ["MOEJAX_MGPU_BLOCKS"] = blocks
                return moe_ragged.grouped_matmul(x, w, group, impl)
            cases.append((impl + (f"[{blocks}]" if blocks else ""), blocks, f))
        os.environ.pop("MOEJAX_MGPU_BLOCKS", None)

    useful = 2 * rows * D * F
    out = {"config": cfg.name, "tokens": args.tokens, "rows": rows, "dtype": args.dtype, "shape": [D, F],
           "group_sizes": np.asarray(group).tolist(), "fullest_over_mean": fullest / (rows / E),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "cudnn_version": cudnn_version() if jax.default_backend() == "gpu" else None, "results": []}
    for name, blocks, f in cases:
        r = {"impl": name}
        try:
            if blocks:
                os.environ["MOEJAX_MGPU_BLOCKS"] = blocks
            fn = jax.jit(f).lower(x, w, group).compile()
            os.environ.pop("MOEJAX_MGPU_BLOCKS", None)
            hlo = fn.as_text()
            got = np.asarray(fn(x, w, group))
            r["max_rel_err"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, w, group))
                times.append(time.perf_counter() - t0)
            r.update(ms=statistics.median(times) * 1e3, useful_tflops=useful / statistics.median(times) / 1e12,
                     hlo_calls_cudnn="cudnn" in hlo.lower(), hlo_dot_ops=hlo.count(" dot("))
        except Exception as e:  # reported: a kernel that does not run here is a result too
            os.environ.pop("MOEJAX_MGPU_BLOCKS", None)
            r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        out["results"].append(r)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    base = next((r["ms"] for r in out["results"] if r["impl"] == "padded" and "ms" in r), None)
    for r in out["results"]:
        if base and "ms" in r:
            r["speedup_vs_padded"] = base / r["ms"]
    print(f"{cfg.name}: {rows} rows over {E} experts ({D}x{F}), fullest queue {out['fullest_over_mean']:.2f}x the "
          f"mean, {jax.devices()[0].device_kind}, cuDNN {out['cudnn_version']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
