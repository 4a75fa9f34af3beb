#!/usr/bin/env python
"""Greedy tokens from Hugging Face transformers on an exported moejax checkpoint, against moejax's.

Runs with the `.[hf]` extra (torch + transformers + numpy; no JAX: of moejax only the byte tokenizer,
which needs nothing else), not in CI:

    python scripts/export_hf.py runs/shakespeare/model /tmp/shakespeare-hf            # moejax venv
    python scripts/infer.py --ckpt runs/shakespeare/model --dtype float32 --temperature 0 \\
        --max-new-tokens 48 --prompt "ROMEO:" --prompt "First Citizen:" --json | tail -n1 > moejax.json
    python scripts/hf_compare_generate.py /tmp/shakespeare-hf moejax.json \\
        --prompt "ROMEO:" --prompt "First Citizen:" [--out results/shakespeare-hf-greedy.json]

MOEJAX_JSON is the last stdout line of `scripts/infer.py --json` (a file holding that line, or a
whole stdout capture: the last line that parses as a JSON object with `generated_ids` is used). Its
report holds the generated ids but not the prompt ids (only their total, `prompt_tokens`), so give
the same prompts: `--prompt TEXT` repeated, in infer.py's order (byte-level: token id = UTF-8 byte,
no BOS, as moejax.tokenizers.bytes.encode; or, when HF_DIR holds a tokenizer.json, transformers'
AutoTokenizer with its special tokens, as moejax's HF tokenizer encodes a text prompt), or `--prompt-ids`
with the JSON list of lists infer.py took.

transformers runs AutoModelForCausalLM (any family moejax exports) in float32, one prompt at a time (no
padding), greedy (do_sample=False) for as many new tokens as moejax's run produced, stopping at the
config's EOS (every eos id of generation_config.json with a tokenizer) as moejax's Generator does (EOS is kept; pass --no-eos to generate the full length regardless). The
comparison is token by token; the report also gives, per prompt and overall, the smallest gap
between transformers' top-1 and top-2 logits over the generated steps (raw logits, before any logits
processor): the margin by which each greedy choice was made, i.e. how much numerical difference it
would take to flip a token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moejax.tokenizers.bytes import decode  # jax-free; with moejax installed, or PYTHONPATH=<repo>


def read_moejax_report(path: str) -> dict:
    with open(path) as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rep = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rep, dict) and "generated_ids" in rep:
            return rep
    sys.exit(f"error: {path}: no JSON object with 'generated_ids' (save the last stdout line of "
             f"scripts/infer.py --json)")


def prompt_ids_of(args, vocab_size: int, tokenizer=None) -> tuple[list[list[int]], bool]:
    if args.prompt and args.prompt_ids:
        sys.exit("error: give --prompt or --prompt-ids, not both")
    if args.prompt_ids:
        src = args.prompt_ids
        if src.startswith("@"):
            with open(src[1:]) as f:
                src = f.read()
        ids = json.loads(src)
        if not (isinstance(ids, list) and ids and all(isinstance(p, list) and p for p in ids)):
            sys.exit("error: --prompt-ids must be a non-empty JSON list of non-empty lists of ints")
        return ids, False
    if not args.prompt:
        sys.exit("error: the moejax report holds no prompt ids: pass the prompts infer.py ran with "
                 "(--prompt TEXT, repeated, in order; infer.py's default was 'The quick brown fox')")
    if tokenizer is not None:
        return [tokenizer(p)["input_ids"] for p in args.prompt], True
    if vocab_size < 256:
        sys.exit(f"error: text prompts need a byte vocabulary (>= 256); this model has {vocab_size}")
    return [list(p.encode("utf-8")) for p in args.prompt], True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="exported Hugging Face checkpoint (scripts/export_hf.py)")
    ap.add_argument("moejax_json", help="the last stdout line of scripts/infer.py --json, saved to a file")
    ap.add_argument("--prompt", action="append", help="prompt text as given to infer.py (repeat, in order)")
    ap.add_argument("--prompt-ids", help="JSON list of lists of prompt token ids, inline or @file")
    ap.add_argument("--max-new-tokens", type=int,
                    help="new tokens per prompt (default: the longest of moejax's generated lists)")
    ap.add_argument("--no-eos", action="store_true",
                    help="do not stop at EOS (moejax's Generator stops at the config's EOS and keeps it)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    rep_mj = read_moejax_report(args.moejax_json)
    mj_ids = rep_mj["generated_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir) if os.path.exists(
        os.path.join(args.hf_dir, "tokenizer.json")) else None
    text = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else decode
    prompts, text_mode = prompt_ids_of(args, cfg.vocab_size, tokenizer)
    if len(prompts) != len(mj_ids):
        sys.exit(f"error: {len(prompts)} prompt(s) given, the moejax report has {len(mj_ids)} generated list(s)")
    if "prompt_tokens" in rep_mj and rep_mj["prompt_tokens"] != sum(len(p) for p in prompts):
        sys.exit(f"error: the prompts given have {sum(len(p) for p in prompts)} tokens in all; moejax's run had "
                 f"{rep_mj['prompt_tokens']}: not the prompts it ran")
    if rep_mj.get("dtype") not in (None, "float32"):
        print(f"note: moejax ran in {rep_mj['dtype']}, transformers runs in float32", file=sys.stderr)
    if rep_mj.get("weights", "").startswith("random"):
        print("note: moejax ran random weights (no --ckpt); HF_DIR must be an export of those", file=sys.stderr)
    max_new = args.max_new_tokens or max(len(g) for g in mj_ids)
    eos = None if args.no_eos else (model.generation_config.eos_token_id if tokenizer is not None
                                    else cfg.eos_token_id)
    eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]

    results, margins_all = [], []
    for i, (p, mj) in enumerate(zip(prompts, mj_ids)):
        x = torch.tensor([p], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=0, eos_token_id=eos, pad_token_id=eos_ids[0] if eos_ids else 0,
                                 num_beams=1, temperature=None, top_k=None, top_p=None,
                                 return_dict_in_generate=True, output_logits=True)
        hf = out.sequences[0, len(p):].tolist()
        stop = [j for j, t in enumerate(hf) if t in eos_ids]
        if stop:  # batch of one: nothing after EOS, but be explicit
            hf = hf[: stop[0] + 1]
        logits = torch.cat([s.float() for s in out.logits], 0)[: len(hf)].numpy().astype(np.float64)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        argmax_ok = bool((logits.argmax(-1) == np.asarray(hf)).all())
        lead = 0
        for a, b in zip(hf, mj):
            if a != b:
                break
            lead += 1
        first_diff = None
        if lead < max(len(hf), len(mj)):
            first_diff = {"step": lead, "transformers": hf[lead] if lead < len(hf) else None,
                          "moejax": mj[lead] if lead < len(mj) else None,
                          "transformers_margin": float(margin[lead]) if lead < len(margin) else None}
        margins_all.extend(margin.tolist())
        results.append({
            "prompt": text(p) if text_mode else None, "prompt_ids": p,
            "moejax_ids": mj, "transformers_ids": hf,
            "moejax_text": text(mj), "transformers_text": text(hf),
            "equal_leading_tokens": lead, "moejax_tokens": len(mj), "transformers_tokens": len(hf),
            "all_equal": hf == mj, "first_difference": first_diff,
            "min_top1_top2_logit_margin": float(margin.min()) if len(margin) else None,
            "min_margin_step": int(margin.argmin()) if len(margin) else None,
            "transformers_argmax_matches_its_tokens": argmax_ok,
        })

    report = {
        "what": f"greedy generation: transformers {type(model).__name__} (float32) on the exported checkpoint vs "
                "moejax", "tokenizer": "transformers AutoTokenizer" if tokenizer is not None else "bytes",
        "hf_dir": args.hf_dir, "moejax_report": args.moejax_json,
        "moejax_weights": rep_mj.get("weights"), "moejax_mesh": rep_mj.get("mesh"),
        "moejax_dtype": rep_mj.get("dtype"), "moejax_moe_kernel": rep_mj.get("moe_kernel"),
        "moejax_capacity_policy": rep_mj.get("capacity_policy"),
        "transformers_dtype": "float32", "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "max_new_tokens": max_new, "eos_token_id": eos,
        "prompts": results,
        "all_equal": all(r["all_equal"] for r in results),
        "min_top1_top2_logit_margin": min(margins_all) if margins_all else None,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
    }
    for i, r in enumerate(results):
        status = "equal" if r["all_equal"] else f"DIFFER at step {r['equal_leading_tokens']} {r['first_difference']}"
        print(f"[{i}] {r['prompt'] if text_mode else r['prompt_ids']!r}: {r['equal_leading_tokens']}/"
              f"{max(r['moejax_tokens'], r['transformers_tokens'])} tokens equal ({status}); "
              f"min top-1/top-2 margin {r['min_top1_top2_logit_margin']:.4g} (step {r['min_margin_step']})")
        print(f"    transformers: {r['transformers_text']!r}")
        if not r["all_equal"]:
            print(f"    moejax:       {r['moejax_text']!r}")
    print(f"{'ALL EQUAL' if report['all_equal'] else 'NOT EQUAL'}: {len(results)} prompt(s), {max_new} new tokens; "
          f"smallest top-1/top-2 logit margin {report['min_top1_top2_logit_margin']:.4g}; "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
