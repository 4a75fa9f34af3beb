"""moejax's server against a peer, same machine, same weights, same workload, alternating rounds.

  --peer static  a second serve.py with --batching static (infer.py's fixed batches: the next batch
                 starts when the last one has finished, prefilled whole), both fed the same requests
                 (default: all at once, in arrival order).
  --peer hf      transformers' own continuous batching (scripts/bench_serve_hf.py, run with
                 --hf-python from the `.[hf]` environment) on the checkpoint exported to Hugging
                 Face's format, at --concurrency (default 16), in float32 on both sides.

    python scripts/bench_compare.py --peer static --ckpt runs/shakespeare/model --json results/cpu-serve-static.json
    python scripts/bench_compare.py --peer hf --ckpt runs/shakespeare/model --hf-python /work/hfvenv/bin/python

Flags after `--` go to every serve.py (default: --slots 16 --dtype float32). Each side runs one
untimed warmup first (the peer script has its own). Medians over --rounds; ratios moejax / peer.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


from moejax.cli.common import ArgumentParser, guarded
from moejax.errors import UserError

ROWS = (("output_throughput", "output tok/s"), ("request_throughput", "requests/s"),
        ("median_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("median_tpot_ms", "TPOT p50 ms"),
        ("median_itl_ms", "ITL p50 ms"), ("median_e2el_ms", "E2E p50 ms"))


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--peer", required=True, choices=("static", "hf"))
    ap.add_argument("--ckpt", required=True, help="the checkpoint both sides serve")
    ap.add_argument("--mesh", default="1x1x1x1")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", default="16,512")
    ap.add_argument("--output-len", default="8,128")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: all at once for static, 16 for hf)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-python", help="python of an environment with the .[hf] extra (torch, transformers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the hf peer")
    ap.add_argument("--json", help="also write the full result here")
    ap.add_argument("server_flags", nargs="*", help="after --: flags for serve.py")
    return ap.parse_args(argv)


def run(args):
    from contextlib import ExitStack

    from moejax.bench.harness import REPO, ServerProcess, alternate, command_runner, server_runner
    from moejax.bench.loadgen import make_workload, parse_range

    inp, outp = parse_range("--input-len", args.input_len), parse_range("--output-len", args.output_len)
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds} must be >= 1")
    if args.peer == "hf" and not args.hf_python:
        raise UserError("--peer hf needs --hf-python PATH (a python with torch and transformers: pip install -e '.[hf]')")
    concurrency = args.concurrency or (16 if args.peer == "hf" else None)
    workload = make_workload(args.num_requests, inp, outp, seed=args.seed)
    flags = ["--mesh", args.mesh, "--ckpt", args.ckpt, "--max-len", str(inp[1] + outp[1]),
             "--max-waiting", str(args.num_requests), *(args.server_flags or ["--slots", "16", "--dtype", "float32"])]
    load = {"concurrency": concurrency}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        log("starting serve.py (compiling) ...")
        ours = stack.enter_context(ServerProcess(*flags))
        runners = {"moejax": server_runner(ours, workload, warmup=16, **load)}
        if args.peer == "static":
            static = stack.enter_context(ServerProcess(*flags, "--batching", "static"))
            runners["static"] = server_runner(static, workload, warmup=16, **load)
        else:
            hf_dir = os.path.join(tmp, "hf")
            command_runner([sys.executable, os.path.join(REPO, "scripts", "export_hf.py"), args.ckpt, hf_dir, "--json"])()
            runners["transformers-cb"] = command_runner(
                [args.hf_python, os.path.join(REPO, "scripts", "bench_serve_hf.py"), "--hf-dir", hf_dir,
                 "--num-requests", str(args.num_requests), "--concurrency", str(concurrency), "--input-len",
                 args.input_len, "--output-len", args.output_len, "--seed", str(args.seed),
                 "--threads", str(args.threads)])
        res = alternate(runners, args.rounds, progress=log)
    (a, ma), (b, mb) = ((name, res[name]["median"]) for name in runners)
    res["ratios"] = {key: ma[key] / mb[key] if mb[key] else None for key, _ in ROWS}
    res["settings"] = {"server_flags": flags, "peer": args.peer, "num_requests": args.num_requests,
                       "input_len": inp, "output_len": outp, "concurrency": concurrency, "rounds": args.rounds,
                       "seed": args.seed, "threads": args.threads if args.peer == "hf" else None}
    print(f"{'median of ' + str(args.rounds) + ' rounds':<20} {a:>16} {b:>16} {'ratio':>8}")
    for key, label in ROWS:
        ratio = res["ratios"][key]
        print(f"{label:<20} {ma[key]:>16.1f} {mb[key]:>16.1f} {ratio if ratio is None else round(ratio, 2):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({"ratios": res["ratios"], a: ma, b: mb, "settings": res["settings"]}))


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
