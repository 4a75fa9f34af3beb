"""The jit benchmark: prefill, TTFT and decode per mesh, with rooflines measured in the same run.

    python scripts/bench.py --config seed --mesh 1x1x1x1 --mesh 1x2x2x2 --batch 8 --prompt-len 128 \\
        --decode-steps 64 --dtype bfloat16 [--layout L] [--microbatches M] [--repeats 5] [--json FILE] \
        [--compare-hf] [--quant none --quant int8]

Meshes run alternately (repeat r of every mesh, then repeat r + 1), so the machine's drift hits all
of them; every figure is the median of --repeats timed runs after a warm-up. Decode is greedy: each
step feeds the argmax of the previous logits. --compare-hf adds transformers' MixtralForCausalLM
with the same weights, dtype, batch and prompt to the rotation (prefill keeping last-position
logits, as moejax's; greedy decode with its KV cache). --quant runs every mesh once per scheme given
(`none`: the float weights), in the same rotation and from the same weights: an A/B in one process,
with each quantized run's last-position prefill logits compared against the float run's.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time


from moejax.cli.common import ArgumentParser
from moejax.cli import flags
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices
from moejax.bench.roofline import Rooflines
from moejax.models import counts

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_model(ap, config_default="seed")
    flags.add_mesh(ap, repeat=True)
    ap.add_argument("--data", help="prompts: consecutive --prompt-len windows of this byte-level text file (the "
                    "routing a trained model sees in use) instead of random token ids")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    flags.add_dtype(ap)
    flags.add_moe(ap)
    flags.add_quant(ap, repeat=True)
    ap.add_argument("--repeats", type=int, default=5)
    flags.add_json(ap, to_file=True)
    ap.add_argument("--compare-hf", action="store_true",
                    help="also time transformers' MixtralForCausalLM (pip install -e '.[hf]')")
    return ap.parse_args(argv)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meshes = args.mesh or ["1x1x1x1"]
        shapes = [parse_mesh(m) for m in meshes]
        for name, v in (("--batch", args.batch), ("--prompt-len", args.prompt_len), ("--repeats", args.repeats)):
            if v < 1:
                raise UserError(f"{name} {v} must be >= 1")
        if args.decode_steps < 0:
            raise UserError(f"--decode-steps {args.decode_steps} must be >= 0")
        provision_host_devices(max(s.size for s in shapes))
        results = run(args, meshes, shapes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def run(args, meshes, shapes) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from moejax.checkpoint import store as checkpoint
    from moejax.models import cache as kv_cache
    from moejax.models import transformer as model
    from moejax.ops import quant as q8
    from moejax.config.model import load_config
    from moejax.inference.generate import fetch, put, round_up
    from moejax.parallel.mesh import make_mesh
    from moejax.parallel.pipeline import bubble_fraction
    from moejax.models.placement import placement
    from moejax.parallel.rules import load_layout

    layout = load_layout(args.layout)
    if args.ckpt:
        cfg = checkpoint.config_of(checkpoint.read_meta(args.ckpt)[0])
    else:
        cfg = load_config(args.config)
    backend = jax.default_backend()
    dtype, _ = flags.compute_dtype(args.dtype, cfg, backend)
    if backend != "cpu" and jax.device_count() < max(s.size for s in shapes):
        raise UserError(f"mesh needs {max(s.size for s in shapes)} devices; this machine has "
                        f"{jax.device_count()} {backend} device(s)")
    B, T, N = args.batch, args.prompt_len, args.decode_steps
    max_len = T + N  # decode step i writes position T + i
    if max_len > cfg.max_seq_len:
        raise UserError(f"--prompt-len {T} + --decode-steps {N} exceeds the config's max_seq_len {cfg.max_seq_len}")
    if args.data:
        from moejax.training import data

        text = data.read_bytes(args.data)
        if len(text) < B * T:
            raise UserError(f"--data {args.data!r} holds {len(text)} bytes, fewer than --batch x --prompt-len = {B * T}")
        tokens_host = data.consecutive_windows(text, T, B)
    else:
        tokens_host = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    if args.compare_hf:
        from moejax.bench.peer import load_torch

        load_torch()  # fail before compiling anything
    runs, peer = [], None
    quants = [None if q == "none" else q for q in (args.quant or ["none"])]
    stored = checkpoint.quant_of(checkpoint.read_meta(args.ckpt)[0]) if args.ckpt else None
    if stored and any(quants):
        raise UserError(f"checkpoint {args.ckpt!r} is already quantized: bench it without --quant")
    quants = [stored] if stored else quants
    for (text, shape), quant in ((m, q) for m in zip(meshes, shapes) for q in quants):
        layout.validate(cfg, shape)
        mesh = make_mesh(shape)
        rs = flags.run_spec(args, cfg, layout, shape, batch=B, platform=backend, dtype=dtype, quant=quant)
        micro = rs.microbatches
        b_pad = round_up(B, rs.batch_multiple)
        tok = np.zeros((b_pad, T), np.int32)
        tok[:B] = tokens_host
        lengths = np.where(np.arange(b_pad) < B, T, 0).astype(np.int32)
        stacked = checkpoint.load_weights(args.ckpt, cfg, 0, dtype, mesh, layout, quant)
        if args.compare_hf and peer is None:
            from moejax.bench.peer import HfPeer

            peer = {"model": HfPeer(cfg, {k: fetch(v) for k, v in stacked.items()}, dtype),
                    "prefill_s": [], "decode_s": []}
        params = model.serving_params(stacked, rs, mesh)
        a_tok, a_len = put(mesh, layout, "tokens", tok), put(mesh, layout, "lengths", lengths)
        cache = kv_cache.init_cache(rs, mesh, b_pad, max_len)
        t0 = time.perf_counter()
        prefill = model.build(rs, mesh, "prefill").lower(params, a_tok, a_len, cache).compile()
        one = put(mesh, layout, "tokens", np.zeros((b_pad, 1), np.int32))
        decode = model.build(rs, mesh, "decode").lower(params, one, a_len, cache).compile()
        greedy = jax.jit(lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32)[:, None],
                         out_shardings=one.sharding).lower(jax.ShapeDtypeStruct(
                             (b_pad, cfg.vocab_size), jnp.float32,
                             sharding=NamedSharding(mesh, layout.act_spec("last_logits")))).compile()
        compile_s = time.perf_counter() - t0
        hlo = prefill.as_text() + decode.as_text()
        rep = placement(cfg, layout, shape, dtype, b_pad, max_len, quant)
        runs.append(dict(text=text, quant=quant, shape=shape, mesh=mesh, rs=rs, params=params, a_tok=a_tok, a_len=a_len,
                         b_pad=b_pad, prefill=prefill, decode=decode, greedy=greedy, compile_s=compile_s,
                         one=one, rep=rep,
                         micro=micro, lengths=lengths, prefill_s=[], decode_s=[], stats=None,
                         hlo={op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES},
                         fused_attention=hlo.count('custom_call_target="__cudnn$fmha'),
                         roof=Rooflines(mesh, dtype)))
        print(f"compiled {text}{f' ({quant})' if quant else ''} in {compile_s:.1f} s", file=sys.stderr)

    def one_pass(r):
        cache = kv_cache.init_cache(r["rs"], r["mesh"], r["b_pad"], max_len)
        t0 = time.perf_counter()
        logits, cache, stats = r["prefill"](r["params"], r["a_tok"], r["a_len"], cache)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        prefill_logits = logits
        for i in range(N):
            pos = put(r["mesh"], layout, "lengths", np.where(r["lengths"] > 0, T + i, -1).astype(np.int32))
            nxt = r["greedy"](logits)
            if backend == "cpu":  # two multi-device programs in flight at once can deadlock XLA:CPU's
                nxt = jax.block_until_ready(nxt)  # collectives on simulated devices (seen on 1x2x2x2)
            logits, cache, _ = r["decode"](r["params"], nxt, pos, cache)
        jax.block_until_ready(logits)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, stats, prefill_logits

    def peer_pass():
        t0 = time.perf_counter()
        logits, cache = peer["model"].prefill(tokens_host)
        t1 = time.perf_counter()
        peer["model"].decode(logits, cache, N)
        return t1 - t0, time.perf_counter() - t1, logits

    warm_logits = [one_pass(r)[3] for r in runs]  # warm-up
    for r, logits in zip(runs, warm_logits):  # a quantized run against the float run of its mesh
        ref = next((fetch(lg)[:B] for q, lg in zip(runs, warm_logits) if q["text"] == r["text"] and not q["quant"]),
                   None)
        if r["quant"] and ref is not None:
            got = fetch(logits)[:B]
            r["vs_float"] = {"logits_max_abs_diff": float(np.max(np.abs(got - ref))),
                             "logits_max_abs": float(np.max(np.abs(ref))),
                             "next_token_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}
    if peer:
        hf_BV = peer_pass()[2].numpy()
        for r, logits in zip(runs, warm_logits):  # like with like: same prompt, last-position logits
            ours_BV = fetch(logits)[:B]
            r["vs_hf"] = {"logits_max_abs_diff": float(np.max(np.abs(ours_BV - hf_BV))),
                          "logits_max_abs": float(np.max(np.abs(hf_BV))),
                          "next_token_agreement": float(np.mean(ours_BV.argmax(-1) == hf_BV.argmax(-1)))}
    for i in range(args.repeats):
        for r in runs:
            p, d, stats, _ = one_pass(r)
            r["prefill_s"].append(p)
            r["decode_s"].append(d)
            r["stats"] = stats
            r["roof"].sample()
        if peer:
            p, d, _ = peer_pass()
            peer["prefill_s"].append(p)
            peer["decode_s"].append(d)
        print(f"\rtimed repeat {i + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    out = {"config": cfg.name, "weights": args.ckpt or "random", "prompts": args.data or "random ids",
           "layout": layout.name, "dtype": dtype, "backend": backend,
           "device_kind": jax.devices()[0].device_kind, "batch": B, "prompt_len": T, "decode_steps": N,
           "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "meshes": []}
    base = None
    for r in runs:
        shape, pl = r["shape"], r["rep"]["placement"]
        pre, dec = statistics.median(r["prefill_s"]), statistics.median(r["decode_s"])
        flops_pre = B * T * counts.flops_per_token_prefill(cfg, T) / pre
        flops_dec = B * N * counts.flops_per_token_decode(cfg, T + N // 2) / dec if N else None
        bytes_step = pl["param_bytes_per_device"] * shape.size + pl["kv_bytes_per_device"] * shape.size / 2
        roof = r["roof"].result()
        stats = {k: fetch(v) for k, v in r["stats"].items()}
        m = {
            "mesh": r["text"], "quant": r["quant"], "quant_matmul": q8.resolve_matmul(args.quant_matmul, backend)
            if r["quant"] else None, "devices": shape.size, "microbatches": r["micro"], "moe_kernel": r["rs"].kernel,
            "bubble_fraction": bubble_fraction(r["micro"], shape.pp), "compile_s": r["compile_s"],
            "ttft_s": pre, "prefill_tokens_per_s": B * T / pre,
            "decode_tokens_per_s": B * N / dec if N else None, "decode_step_ms": dec / N * 1e3 if N else None,
            "tokens_per_ms_per_device": B * (T + N) / ((pre + dec) * 1e3) / shape.size,
            "prefill_flops_per_s": flops_pre, "decode_flops_per_s": flops_dec,
            "matmul_roofline_flops_per_s": roof["matmul_flops_per_s"],
            "prefill_mfu": flops_pre / roof["matmul_flops_per_s"],
            "weight_bytes_per_device": pl["param_bytes_per_device"], "kv_bytes_per_device": pl["kv_bytes_per_device"],
            "bandwidth_bytes_per_s": roof["bandwidth_bytes_per_s"],
            "decode_roofline_tokens_per_s": B * roof["bandwidth_bytes_per_s"] / bytes_step,
            "decode_bytes_per_step": bytes_step,  # weights + half the KV cache, all devices
            "decode_bytes_per_s": bytes_step * N / dec if N else None,  # to read against a datasheet figure
            "peak_rss_gb_so_far": rss_gb(), "device_peak_bytes": device_peak(r["mesh"]),
            "hlo_collectives": r["hlo"], "hlo_cudnn_attention_calls": r["fused_attention"],
            "moe": {"dropped": int(stats["dropped"].sum()),
                    "requested_tokens_per_expert": stats["load"].astype(int).tolist(),
                    "served_tokens_per_expert": stats["served_load"].astype(int).tolist(),
                    "computed_over_topk": float(stats["computed_rows"].sum() / max(1, stats["load"].sum())),
                    "exchanged_over_topk": float(stats["exchanged_rows"].sum() / max(1, stats["load"].sum()))},
            "prefill_times_s": r["prefill_s"], "decode_times_s": r["decode_s"],
        }
        if "vs_float" in r:
            m["prefill_logits_vs_float"] = r["vs_float"]
            flt = next(f for f in out["meshes"] if f["mesh"] == r["text"] and not f["quant"])
            m["decode_vs_float"] = m["decode_tokens_per_s"] / flt["decode_tokens_per_s"] if N else None
            m["prefill_vs_float"] = m["prefill_tokens_per_s"] / flt["prefill_tokens_per_s"]
        m["decode_fraction_of_roofline"] = (m["decode_tokens_per_s"] / m["decode_roofline_tokens_per_s"]
                                            if N else None)
        if base is None:
            base = m
        m["prefill_time_vs_first_mesh"] = pre / base["ttft_s"]
        if shape.pp > 1 and base["devices"] == shape.size and r["rs"].shape.pp != runs[0]["shape"].pp:
            ideal = base["ttft_s"] * (r["micro"] + shape.pp - 1) / r["micro"]
            m["pipeline_ideal_s"] = ideal
            m["prefill_vs_pipeline_ideal"] = pre / ideal
        out["meshes"].append(m)
    if peer:
        import torch
        import transformers

        pre, dec = statistics.median(peer["prefill_s"]), statistics.median(peer["decode_s"])
        out["hf"] = {"peer": f"transformers {transformers.__version__} MixtralForCausalLM, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads",
                     "ttft_s": pre, "prefill_tokens_per_s": B * T / pre,
                     "decode_tokens_per_s": B * N / dec if N else None,
                     "prefill_times_s": peer["prefill_s"], "decode_times_s": peer["decode_s"]}
        for m, r in zip(out["meshes"], runs):
            m["prefill_vs_hf"] = m["prefill_tokens_per_s"] / out["hf"]["prefill_tokens_per_s"]
            m["decode_vs_hf"] = m["decode_tokens_per_s"] / out["hf"]["decode_tokens_per_s"] if N else None
            m["prefill_logits_vs_hf"] = r["vs_hf"]
    return out


def device_peak(mesh):
    stats = mesh.devices.flat[0].memory_stats() if hasattr(mesh.devices.flat[0], "memory_stats") else None
    return int(stats.get("peak_bytes_in_use", 0)) if stats else None


def print_table(res: dict) -> None:
    print(f"config {res['config']} ({res['dtype']}), batch {res['batch']} x {res['prompt_len']} prompt, "
          f"{res['decode_steps']} decode steps, {res['backend']} ({res['device_kind']}), medians of {res['repeats']}")
    cols = [("mesh", "mesh", "{}"), ("weights", "quant", "{}"), ("M", "microbatches", "{}"), ("compile s", "compile_s", "{:.1f}"),
            ("TTFT ms", "ttft_s", "{:.1f}", 1e3), ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
            ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
            ("tok/ms/dev", "tokens_per_ms_per_device", "{:.3f}"),
            ("prefill GFLOP/s", "prefill_flops_per_s", "{:.0f}", 1e-9),
            ("matmul roof GFLOP/s", "matmul_roofline_flops_per_s", "{:.0f}", 1e-9),
            ("MFU", "prefill_mfu", "{:.2f}"), ("decode/BW roof", "decode_fraction_of_roofline", "{:.2f}"),
            ("weights MB/dev", "weight_bytes_per_device", "{:.1f}", 1e-6),
            ("KV MB/dev", "kv_bytes_per_device", "{:.2f}", 1e-6), ("peak RSS GB", "peak_rss_gb_so_far", "{:.1f}"),
            ("prefill vs first", "prefill_time_vs_first_mesh", "{:.2f}")]
    print("| " + " | ".join(c[0] for c in cols) + " | collectives (a2a/ag/ar/rs/cp) |")
    print("|" + "---|" * (len(cols) + 1))
    for m in res["meshes"]:
        cells = ["float" if c[1] == "quant" and m[c[1]] is None else "-" if m[c[1]] is None else c[2].format(m[c[1]] * (c[3] if len(c) > 3 else 1)) for c in cols]
        h = m["hlo_collectives"]
        cells.append("/".join(str(h[k]) for k in COLLECTIVES))
        print("| " + " | ".join(cells) + " |")
    if "hf" in res:
        hf = res["hf"]
        dec = "-" if hf["decode_tokens_per_s"] is None else f"{hf['decode_tokens_per_s']:.1f}"
        print(f"{hf['peer']}: TTFT {hf['ttft_s'] * 1e3:.1f} ms, prefill {hf['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {dec} tok/s")
        for m in res["meshes"]:
            ratio = "" if m["decode_vs_hf"] is None else f", decode {m['decode_vs_hf']:.2f}x"
            agree = m["prefill_logits_vs_hf"]
            print(f"{m['mesh']} vs transformers: prefill {m['prefill_vs_hf']:.2f}x{ratio}; last-position logits "
                  f"max |diff| {agree['logits_max_abs_diff']:.3g} (of max |logit| {agree['logits_max_abs']:.3g}), "
                  f"same next token for {agree['next_token_agreement']:.0%} of the batch")
    for m in res["meshes"]:
        if "prefill_logits_vs_float" in m:
            agree = m["prefill_logits_vs_float"]
            ratio = "" if m["decode_vs_float"] is None else f"decode {m['decode_vs_float']:.2f}x, "
            print(f"{m['mesh']} {m['quant']} ({m['quant_matmul']} matmuls) vs float: {ratio}prefill "
                  f"{m['prefill_vs_float']:.2f}x; last-position logits max |diff| {agree['logits_max_abs_diff']:.3g} "
                  f"(of max |logit| {agree['logits_max_abs']:.3g}), same next token for "
                  f"{agree['next_token_agreement']:.0%} of the batch")
        if "pipeline_ideal_s" in m:
            print(f"{m['mesh']}: pipelined prefill {m['ttft_s'] * 1e3:.1f} ms vs ideal T(pp=1) x (M+P-1)/M = "
                  f"{m['pipeline_ideal_s'] * 1e3:.1f} ms: {m['prefill_vs_pipeline_ideal']:.2f}x")
