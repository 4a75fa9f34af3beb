"""XLA:CPU's options side by side: `moejax bench model` once per XLA_FLAGS variant, alternating rounds.

    python -m moejax bench xla-flags --config configs/shakespeare-bpe.yaml --batch 16 --prompt-len 512 \\
        --decode-steps 32 --moe-kernel batched [--variant NAME=FLAGS ...] [--rounds 3] [--json FILE]

XLA reads XLA_FLAGS once, when the process starts, so each variant runs in its own process; round r
runs every variant once (then round r + 1), so the machine's drift hits them all. Each run is
`moejax bench model` with --repeats 3 (its own warm-up, its median); this prints the median over rounds
of prefill (TTFT) time, decode step time and compile time per variant, and the ratio to the first
variant. Without --variant: the defaults, and each option of this jax's XLA:CPU that changes which
kernels run (oneDNN, XNNPACK off, XNNPACK fusions, YNN, Eigen single-threaded, the fast-compile
preset); fast math changes results (it is measured, never adopted).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from moejax.cli.common import ArgumentParser
from moejax.errors import UserError

VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn-fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "eigen-1-thread": "--xla_cpu_multi_thread_eigen=false",
    "fast-compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    "fast-math": "--xla_cpu_enable_fast_math=true",
}


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a variant to time (repeatable; the first is the baseline of the ratios)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write every run's figures here")
    args, model_args = ap.parse_known_args(argv)
    return args, model_args


def run_once(flags: str, model_args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "XLA_FLAGS": flags}
        r = subprocess.run([sys.executable, "-m", "moejax", "bench", "model", "--repeats", "3", *model_args,
                            "--json", f.name], env=env, capture_output=True, text=True)
        if r.returncode:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"error": f"exit {r.returncode}: {tail[:200]}"}
        m = json.load(open(f.name))["meshes"][0]
    return {"ttft_ms": m["ttft_s"] * 1e3, "decode_step_ms": m["decode_step_ms"], "compile_s": m["compile_s"]}


def main(argv=None) -> int:
    args, model_args = parse_args(argv)
    variants = dict(VARIANTS)
    if args.variant:
        variants = {}
        for v in args.variant:
            if "=" not in v:
                print(f"error: --variant {v!r}: expected NAME=FLAGS", file=sys.stderr)
                return 2
            name, flags = v.split("=", 1)
            variants[name] = flags
    if args.rounds < 1:
        print(f"error: --rounds {args.rounds} must be >= 1", file=sys.stderr)
        return 2
    runs = {name: [] for name in variants}
    try:
        for r in range(args.rounds):
            for name, flags in variants.items():
                runs[name].append(run_once(flags, model_args))
                print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("ttft_ms", "decode_step_ms", "compile_s")
    med = {name: {k: statistics.median(x[k] for x in rs) for k in keys} if all("error" not in x for x in rs)
           else {"error": next(x["error"] for x in rs if "error" in x)} for name, rs in runs.items()}
    base = next(iter(med.values()))
    print(f"{'variant':<16} {'TTFT ms':>9} {'decode ms':>10} {'compile s':>10}   ratios to {next(iter(med))}")
    for name, m in med.items():
        if "error" in m:
            print(f"{name:<16} {m['error']}")
            continue
        ratio = "" if "error" in base else " ".join(f"{m[k] / base[k]:.2f}" for k in keys)
        print(f"{name:<16} {m['ttft_ms']:9.1f} {m['decode_step_ms']:10.2f} {m['compile_s']:10.1f}   {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model_args": model_args, "variants": variants, "runs": runs, "medians": med}, f, indent=1)
    return 0
