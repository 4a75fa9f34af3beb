"""Run the MoE model on a (dp, pp, tp, ep) mesh: placement, prefill, decode, metrics.

    moejax infer --mesh 4x2x4x4                 # seed config, random weights, 128 CPU devices
    moejax infer --mesh 4x2x4x4 --plan --json   # where everything lives; builds nothing
(`python scripts/infer.py ...` is the same command.)
"""

from __future__ import annotations

import json
import sys


from moejax.cli.common import ArgumentParser, distributed_settings, guarded  # no JAX yet: devices come first
from moejax.cli import flags
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices

DEFAULT_PROMPT = "The quick brown fox"


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_mesh(ap)
    flags.add_model(ap)
    flags.add_tokenizer(ap)
    ap.add_argument("--prompt", action="append", help="text prompt (repeat for a batch)")
    ap.add_argument("--prompt-ids", help="JSON list of lists of token ids, inline or @file")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-len", type=int, help="KV-cache length (default: longest prompt + max new tokens)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    flags.add_dtype(ap)
    flags.add_moe(ap)
    flags.add_quant(ap)
    ap.add_argument("--decode-chunk", type=int,
                    help="decode K steps per dispatch in one compiled loop on the device, sampling there too "
                         "(default 16 on GPU; 0 on CPU: the host loop, one dispatch a step)")
    ap.add_argument("--batch", type=int, help="batch for --plan's KV-cache figure (default: number of prompts)")
    ap.add_argument("--plan", action="store_true", help="print the placement report only (shapes, no weights)")
    flags.add_json(ap)
    flags.add_multiprocess(ap)
    return ap.parse_args(argv)


def read_prompt_ids(text: str) -> list[list[int]]:
    src = text
    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                src = f.read()
        except OSError as e:
            raise UserError(f"--prompt-ids {text}: cannot read file ({e.strerror})") from None
    try:
        ids = json.loads(src)
    except json.JSONDecodeError:
        raise UserError(f"--prompt-ids {text[:60]!r} is not JSON: expected a list of lists of ints, "
                        f"e.g. [[1, 2, 3]]") from None
    if not (isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids)
            and all(isinstance(t, int) and not isinstance(t, bool) for p in ids for t in p)):
        raise UserError(f"--prompt-ids {text[:60]!r}: expected a non-empty list of lists of ints, e.g. [[1, 2, 3]]")
    return ids


def run(args) -> dict:
    shape = parse_mesh(args.mesh)
    dist = None if args.plan else distributed_settings(args)
    multi, nproc = dist is not None, dist[1] if dist else 1
    provisioned = False
    if not args.plan:  # before anything starts JAX (reading a checkpoint does)
        if shape.size % nproc:
            raise UserError(f"mesh {shape} ({shape.size} devices) does not split over {nproc} processes")
        provisioned = provision_host_devices(shape.size // nproc, exact=bool(multi))
    from moejax.checkpoint.store import resolve_quant, serving_config
    from moejax.parallel.rules import load_layout

    layout = load_layout(args.layout)
    cfg = serving_config(args.ckpt, args.config)
    quant = resolve_quant(args.ckpt, args.quant)
    layout.validate(cfg, shape)
    tok = flags.tokenizer(args, cfg)
    dtype = args.dtype or cfg.param_dtype  # --plan: as stored (no platform is started)
    for name, v in (("--max-new-tokens", args.max_new_tokens), ("--microbatches", args.microbatches),
                    ("--batch", args.batch), ("--max-len", args.max_len)):
        if v is not None and v < 1:
            raise UserError(f"{name} {v} must be >= 1")

    if args.decode_chunk is not None and args.decode_chunk < 0:
        raise UserError(f"--decode-chunk {args.decode_chunk} must be >= 0 (0: one dispatch a step)")
    if args.plan:
        from moejax.models.placement import format_placement, placement

        rep = placement(cfg, layout, shape, dtype, args.batch or max(1, len(args.prompt or [])),
                        args.max_len or cfg.max_seq_len, quant)
        print(format_placement(rep))
        return rep

    import jax

    if multi:  # every value explicit: JAX reads only the coordinator address from the environment
        jax.distributed.initialize(coordinator_address=dist[0], num_processes=dist[1], process_id=dist[2])
    from moejax.models import transformer as model
    from moejax.inference.generate import Generator, check_prompts, padded_batch, round_up
    from moejax.parallel.mesh import make_mesh
    from moejax.models.placement import format_placement, placement
    from moejax.inference.sampling import Sampling

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    backend = jax.default_backend()
    if backend != "cpu" and jax.device_count() < shape.size:
        raise UserError(f"mesh {shape} needs {shape.size} devices; this machine has {jax.device_count()} "
                        f"{backend} device(s)")
    if backend == "cpu" and provisioned and shape.size > 1:
        say(f"running on {shape.size} simulated CPU devices (--xla_force_host_platform_device_count)")
    mesh = make_mesh(shape)
    dtype, note = flags.compute_dtype(args.dtype, cfg, backend)
    if note:
        say(note)

    if args.prompt_ids:
        prompts, text_mode = read_prompt_ids(args.prompt_ids), False
    else:
        prompts, text_mode = [tok.encode(p) for p in (args.prompt or [DEFAULT_PROMPT])], True
    check_prompts(prompts, cfg.vocab_size)
    longest = max(len(p) for p in prompts)
    max_len = args.max_len or (longest + args.max_new_tokens)
    if longest + args.max_new_tokens > max_len or max_len > cfg.max_seq_len:
        raise UserError(f"prompt of {longest} tokens + {args.max_new_tokens} new tokens does not fit the maximum "
                        f"length {min(max_len, cfg.max_seq_len)} (config max_seq_len {cfg.max_seq_len})")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)

    rs = flags.run_spec(args, cfg, layout, shape, batch=len(prompts), platform=backend, dtype=dtype, quant=quant)
    rs, kernel_choice = flags.measured_kernel(rs, mesh, (len(prompts), len(prompts) * longest), say)
    micro = rs.microbatches
    rep = placement(cfg, layout, shape, dtype, padded_batch(rs, len(prompts)), max_len, quant)
    say(format_placement(rep))

    from moejax.checkpoint.store import load_weights

    params = model.serving_params(load_weights(args.ckpt, cfg, args.seed, dtype, mesh, layout, quant), rs, mesh)
    prompt_len = min(round_up(longest, 8), max_len)
    chunk = args.decode_chunk if args.decode_chunk is not None else (0 if backend == "cpu" else 16)
    gen = Generator(rs, mesh, params, len(prompts), prompt_len, max_len, decode_chunk=chunk)
    say(f"compiled prefill + decode in {gen.compile_s:.1f} s (batch {gen.batch} padded from {len(prompts)}, "
        f"{micro} microbatch(es), capacity policy {rs.policy}, MoE kernel {rs.kernel})")

    def progress(step, total, secs):
        if lead:
            print(f"\rdecoding {step}/{total} steps  {step * len(prompts) / max(secs, 1e-9):.1f} tok/s",
                  end="", file=sys.stderr, flush=True)

    res = gen.generate(prompts, args.max_new_tokens, sampling, tok.eos_ids, progress)
    if lead and res["new_tokens"] > len(prompts):
        print(file=sys.stderr)
    origin = "" if args.ckpt else f" [random weights (seed {args.seed}), no --ckpt: not a trained model]"
    for i, out in enumerate(res["generated_ids"]):
        shown = f"{tok.decode(prompts[i])!r} -> {tok.decode(out)!r} (ids {out})" if text_mode else str(out)
        say(f"[{i}] {shown}{origin}")
    moe = res["moe"]
    say(f"TTFT {res['ttft_s'] * 1e3:.1f} ms | prefill {res['prefill_tokens_per_s']:.1f} tok/s | decode "
        f"{res['decode_tokens_per_s']:.1f} tok/s | {res['tokens_per_ms_per_device']:.3g} tokens/ms/device")
    say(f"MoE: {moe['assignments']} assignments, dropped {moe['dropped']}, rerouted {moe['rerouted']}, "
        f"max/mean expert load requested {moe['max_load_ratio']:.2f}, served {moe['served_max_load_ratio']:.2f}")
    rep.update({k: v for k, v in res.items()})
    rep.update({"generated_text": [tok.decode(o) for o in res["generated_ids"]], "tokenizer": tok.source or tok.kind})
    rep.update({"weights": args.ckpt or f"random (seed {args.seed})", "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "compile_s": gen.compile_s, "decode_chunk": chunk, "capacity_policy": rs.policy,
                "capacity_factor": rs.capacity_factor, "moe_kernel": rs.kernel, "moe_kernel_choice": kernel_choice,
                "microbatches": micro,
                "batch_padded": gen.batch})
    return rep


def main(argv=None) -> int:
    args = parse_args(argv)

    def run_and_report(args):
        rep = run(args)
        if args.json:  # every process prints its own report (its view of the same run)
            print(json.dumps(rep))

    return guarded(run_and_report, args)
