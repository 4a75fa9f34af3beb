#!/usr/bin/env python
"""lm-evaluation-harness on a moejax server against lm-eval's own `hf` backend on the exported model:
the same task (eval/shakespeare_mc.yaml), accuracy and every choice's log-likelihood side by side.

Needs lm-eval, torch and transformers (`pip install -e '.[eval]'`, or a separate venv holding them:
this script imports no JAX); the server runs under MOEJAX_PYTHON (default: this interpreter).

    python scripts/lm_eval_compare.py --ckpt runs/shakespeare-bpe/model --hf /tmp/shakespeare-bpe-hf \\
        [--moejax-python .venv/bin/python] [--limit N] [--out results/lm-eval-shakespeare-mc.json]

The server side is lm-eval's `local-completions` model with no local tokenizer: lm-eval finds the
server's /tokenizer_info and /tokenize and tokenizes remotely, then sends batches of token-id prompts
with echo + logprobs (the log-likelihood of each choice is the sum of its tokens' logprobs). The `hf`
side loads HF_DIR (export_hf of the same checkpoint) in float32 with add_bos_token=False: lm-eval's hf
backend otherwise encodes with the tokenizer's special tokens (a BOS in front of every context) while
local-completions' remote tokenizer encodes without them, and the two would score different ids (a
~0.01-nat difference per choice, up to 0.4). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(python: str, ckpt: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([python, "-m", "moejax", "serve", "--ckpt", ckpt, "--mesh", "1x1x1x1", "--dtype",
                             "float32", "--port", "0", "--slots", "4", "--max-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.time() + 600
    for line in proc.stdout:
        print(f"  server: {line.rstrip()}", file=sys.stderr)
        m = re.search(r"serving (\S+) at (http://\S+)", line)
        if m:
            return proc, m.group(2)
        if time.time() > deadline:
            break
    proc.kill()
    sys.exit("error: the moejax server did not start")


def per_choice(result: dict) -> list[list[float]]:
    """Each document's choices' log-likelihoods, in document order."""
    samples = sorted(result["samples"]["shakespeare_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="moejax checkpoint (with its tokenizer)")
    ap.add_argument("--hf", required=True, help="export_hf of the same checkpoint")
    ap.add_argument("--moejax-python", default=sys.executable, help="interpreter with moejax installed")
    ap.add_argument("--limit", type=int, help="the first N documents only")
    ap.add_argument("--out", help="write the comparison JSON here")
    args = ap.parse_args(argv)

    import lm_eval
    from lm_eval.tasks import TaskManager

    os.chdir(REPO)  # the task's data path is relative to the repository
    tasks = TaskManager(include_path=os.path.join(REPO, "eval"))
    common = dict(tasks=["shakespeare_mc"], task_manager=tasks, log_samples=True, limit=args.limit, num_fewshot=0)
    proc, url = start_server(args.moejax_python, args.ckpt)
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"model={os.path.basename(os.path.normpath(args.ckpt))},"
            f"base_url={url}/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=True,batch_size=4",
            **common)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={args.hf},dtype=float32,device=cpu,add_bos_token=False", batch_size=4, **common)
    a, b = per_choice(served), per_choice(hf)
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    report = {
        "task": "shakespeare_mc", "documents": len(a), "choices": len(diffs),
        "moejax_server": served["results"]["shakespeare_mc"], "lm_eval_hf": hf["results"]["shakespeare_mc"],
        "max_abs_loglikelihood_diff": max(diffs), "mean_abs_loglikelihood_diff": sum(diffs) / len(diffs),
        "same_choice_ranking": all(max(range(len(ra)), key=ra.__getitem__) == max(range(len(rb)), key=rb.__getitem__)
                                   for ra, rb in zip(a, b)),
        "loglikelihoods": {"moejax_server": a, "lm_eval_hf": b},
        "versions": {"lm_eval": lm_eval.__version__},
    }
    acc = lambda r: r.get("acc,none")
    print(f"shakespeare_mc, {len(a)} documents: acc moejax server {acc(report['moejax_server'])}, lm-eval hf "
          f"{acc(report['lm_eval_hf'])}; per-choice log-likelihood |diff| max {report['max_abs_loglikelihood_diff']:.3g}"
          f", mean {report['mean_abs_loglikelihood_diff']:.3g}; same ranking: {report['same_choice_ranking']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
