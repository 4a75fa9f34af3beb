"""bench_serve.py's load and metrics against the peer: transformers' own continuous batching.

    /work/hfvenv/bin/python scripts/bench_serve_hf.py --hf-dir /tmp/hf-shakespeare     # 64 requests, 16 at a time
    /work/hfvenv/bin/python scripts/bench_serve_hf.py --hf-dir DIR --input-len 16,128 --output-len 8,32 \\
        --num-requests 16 --threads 2 --check --json peer.json

Same workload (moejax/bench/loadgen.py's make_workload: same flags, same seed, same prompts) and
same statistics (vLLM's TTFT, TPOT, ITL, E2EL) as scripts/bench_serve.py, so the two tables compare.
The peer (moejax/bench/peer_cb.py) holds the checkpoint in float32 and serves it through
`model.init_continuous_batching(...)`: streaming requests, greedy, EOS off, at most `--concurrency`
in flight (all sent at once, as bench_serve without --request-rate). A warmup of `concurrency`
short requests runs first, untimed. --check first compares the CB path's tokens with
`model.generate`'s. Make DIR with `python scripts/export_hf.py runs/shakespeare/model DIR`
(moejax's venv). Runs in the `.[hf]` environment (torch, transformers, numpy); imports no jax.
The last stdout line is one JSON object: the summary, the run's settings and transformers' settings.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time


from moejax.cli.common import ArgumentParser, guarded
from moejax.errors import UserError
from moejax.bench import loadgen  # no jax, no httpx needed here


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--hf-dir", required=True, help="a Hugging Face Mixtral directory (scripts/export_hf.py)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    ap.add_argument("--input-len", default="16,512", help="prompt tokens LO,HI (inclusive)")
    ap.add_argument("--output-len", default="8,128", help="max_tokens LO,HI (inclusive)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the workload")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON summary to FILE")
    ap.add_argument("--check", action="store_true",
                    help="first compare the CB path's greedy tokens (the workload's first `concurrency` "
                         "requests, batched) with model.generate's, one prompt at a time")
    g = ap.add_argument_group("transformers continuous batching")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "paged|eager"], help="attention implementation")
    g.add_argument("--page-size", type=int, default=256, help="tokens per cache page (transformers' default)")
    g.add_argument("--num-blocks", type=int,
                   help="cache blocks (default: concurrency x (pages of the longest request + 1))")
    g.add_argument("--max-batch-tokens", type=int, help="query tokens per forward (default: transformers' 8192)")
    g.add_argument("--block-sharing", action="store_true", help="allow prefix (block) sharing")
    return ap.parse_args(argv)


def run(args) -> dict:
    input_len = loadgen.parse_range("--input-len", args.input_len)
    output_len = loadgen.parse_range("--output-len", args.output_len)
    for flag, v in (("--num-requests", args.num_requests), ("--concurrency", args.concurrency),
                    ("--threads", args.threads), ("--page-size", args.page_size), ("--num-blocks", args.num_blocks),
                    ("--max-batch-tokens", args.max_batch_tokens)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v} must be >= 1")
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise UserError(f"--hf-dir {args.hf_dir}: no config.json (make one with scripts/export_hf.py)")

    import torch

    from moejax.bench import peer_cb
    if args.threads:
        torch.set_num_threads(args.threads)
    model = peer_cb.load_model(args.hf_dir, attn=args.attn)
    max_seq = input_len[1] + output_len[1]
    if max_seq > model.config.max_position_embeddings:
        raise UserError(f"--input-len {input_len[1]} + --output-len {output_len[1]} tokens exceed the model's "
                        f"max_position_embeddings {model.config.max_position_embeddings}")
    vocab = model.config.vocab_size
    workload = loadgen.make_workload(args.num_requests, input_len, output_len, vocab, args.seed)
    print(f"{len(workload)} requests to transformers {peer_cb.transformers.__version__} continuous batching "
          f"({args.hf_dir}, {args.attn}, float32, {torch.get_num_threads()} threads), concurrency "
          f"{args.concurrency}, input {input_len[0]}..{input_len[1]}, output {output_len[0]}..{output_len[1]} "
          f"tokens", flush=True)

    check = None
    if args.check:  # the reference before the manager exists (which may switch the attention implementation)
        check = {"requests": workload[:args.concurrency]}
        check["generate"] = [peer_cb.plain_generate(model, p, n) for p, n in check["requests"]]

    num_blocks = args.num_blocks or peer_cb.default_num_blocks(args.concurrency, max_seq, args.page_size)
    t = time.perf_counter()
    peer = peer_cb.CBPeer(model, num_blocks=num_blocks, page_size=args.page_size,
                          max_batch_tokens=args.max_batch_tokens, block_sharing=args.block_sharing)
    try:
        settings = peer.settings()
        settings["setup_s"] = time.perf_counter() - t
        if check is not None:
            cb = peer.generate(check["requests"])
            check["mismatched"] = [i for i, (a, b) in enumerate(zip(cb, check["generate"])) if a != b]
            check["tokens"] = sum(len(c) for c in cb)
            print(f"parity: CB {'!=' if check['mismatched'] else '=='} model.generate over {len(cb)} requests, "
                  f"{check['tokens']} tokens; mismatched requests: {check['mismatched']}", flush=True)
        n_warm = min(args.concurrency, len(workload))
        warm, settings["warmup_s"] = asyncio.run(peer.run([(p, min(4, m)) for p, m in workload[:n_warm]],
                                                          args.concurrency))
        settings["warmup_requests"] = n_warm
        if not all(r.ok for r in warm):
            raise RuntimeError(f"warmup failed: {next(r.error for r in warm if not r.ok)}")
        results, duration = asyncio.run(peer.run(workload, args.concurrency))
    finally:
        peer.close()

    summary = loadgen.summarize(results, duration)
    print(loadgen.format_table(summary))
    errors = collections.Counter(r.error for r in results if not r.ok)
    for message, count in errors.most_common(5):
        print(f"failed: {count} x {message}")
    report = dict(summary)
    report.update({"server": "transformers-cb", "hf_dir": args.hf_dir, "num_requests": len(workload),
                   "concurrency": args.concurrency, "request_rate": None, "input_len": list(input_len),
                   "output_len": list(output_len), "seed": args.seed, "vocab_size": vocab, "errors": dict(errors),
                   "transformers_cb": settings})
    if check is not None:
        report["parity"] = {"match": not check["mismatched"], "requests": len(check["requests"]),
                            "tokens": check["tokens"], "mismatched": check["mismatched"]}
    loadgen.emit_report(report, args.json)
    return report


def main(argv=None) -> int:
    reports = []
    guarded(lambda a: reports.append(run(a)), parse_args(argv))
    bad = reports and (reports[0]["failed"] or not reports[0].get("parity", {"match": True})["match"])
    return 1 if bad else 0
