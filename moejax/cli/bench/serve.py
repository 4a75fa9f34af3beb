"""Load an OpenAI-compatible completions server and report vLLM's serving metrics.

    python scripts/bench_serve.py http://127.0.0.1:8000                       # 64 requests, all at once
    python scripts/bench_serve.py http://127.0.0.1:8000 --concurrency 8 --input-len 128,128 \\
        --output-len 64,64 --json result.json
    python scripts/bench_serve.py http://127.0.0.1:8000 --request-rate 4      # Poisson arrivals, 4 req/s

Prompts are random token ids (printable ASCII for a byte vocabulary), lengths uniform over the
inclusive ranges; every request streams greedily with ignore_eos, so it asks for exactly its
max_tokens. TTFT, TPOT, ITL and E2EL are vLLM's (moejax/bench/loadgen.py defines them). The last
stdout line is one JSON object: the summary and the run's settings (request_rate null = inf).
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys


from moejax.cli.common import ArgumentParser, guarded
from moejax.errors import UserError


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", help="model id to request (default: the first id from URL/v1/models)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, help="most requests in flight (default: no cap)")
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second (default inf: all at once)")
    ap.add_argument("--input-len", default="16,512", help="prompt tokens LO,HI (inclusive)")
    ap.add_argument("--output-len", default="8,128", help="max_tokens LO,HI (inclusive)")
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="every prompt starts with the same N tokens, then its own --input-len tokens")
    ap.add_argument("--prefixes", type=int, default=1,
                    help="with --shared-prefix: K different prefixes, one drawn per request (K system prompts)")
    ap.add_argument("--vocab-size", type=int, default=256,
                    help="prompt ids below this (>= 256: printable ASCII 32..126)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the workload and the arrival times")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds for the whole run; requests still open then count as failed")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON summary to FILE")
    ap.add_argument("--half-peak", action="store_true",
                    help="instead: TTFT of the idle server (--idle-requests one at a time), the peak request "
                         "rate (all requests at once), and TTFT under Poisson arrivals at half the peak rate")
    ap.add_argument("--idle-requests", type=int, default=16)
    return ap.parse_args(argv)


def served_models(url: str, timeout_s: float) -> list[dict]:
    """The entries of GET URL/v1/models; a server that cannot be reached is a UserError."""
    import httpx

    try:
        resp = httpx.get(url + "/v1/models", timeout=min(timeout_s, 30.0))
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise UserError(f"GET {url}/v1/models: HTTP {resp.status_code}")
    try:
        return [m for m in resp.json()["data"] if isinstance(m, dict) and "id" in m]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"GET {url}/v1/models: not an OpenAI model list: {resp.text[:200]!r}") from None


def run(args) -> dict:
    from moejax.bench.loadgen import emit_report, format_table, make_workload, parse_range, run_load, summarize

    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"URL {args.url!r}: expected http://HOST:PORT or https://...")
    input_len = parse_range("--input-len", args.input_len)
    output_len = parse_range("--output-len", args.output_len)
    for flag, v in (("--num-requests", args.num_requests), ("--concurrency", args.concurrency)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v} must be >= 1")
    if not args.request_rate > 0:
        raise UserError(f"--request-rate {args.request_rate} must be > 0 (default inf: all at once)")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be > 0")

    models = served_models(url, args.timeout)
    ids = [m["id"] for m in models]
    model = args.model or (ids[0] if ids else None)
    if model is None:
        raise UserError(f"{url}/v1/models lists no model; pass --model")
    if model not in ids:
        raise UserError(f"--model {model!r} is not served by {url} (it serves {', '.join(ids) or 'nothing'})")
    max_len = next(m for m in models if m["id"] == model).get("max_model_len")
    if isinstance(max_len, int) and input_len[1] + output_len[1] > max_len:
        raise UserError(f"--input-len {input_len[1]} + --output-len {output_len[1]} tokens exceed the model's "
                        f"max_model_len {max_len}")

    workload = make_workload(args.num_requests, input_len, output_len, args.vocab_size, args.seed, args.shared_prefix,
                             args.prefixes)
    if args.half_peak:
        return half_peak(args, url, model, workload)
    from tqdm import tqdm

    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(f"{len(workload)} requests to {url} (model {model}), request rate {rate}, "
          f"concurrency {args.concurrency or 'uncapped'}, input {input_len[0]}..{input_len[1]}, "
          f"output {output_len[0]}..{output_len[1]} tokens", flush=True)
    with tqdm(total=len(workload), file=sys.stderr) as bar:
        results, duration = asyncio.run(run_load(url, model, workload, args.concurrency, args.request_rate,
                                                 args.seed, args.timeout, lambda r: bar.update(1)))
    summary = summarize(results, duration)
    print(format_table(summary))
    errors = collections.Counter(r.error for r in results if not r.ok)
    for message, count in errors.most_common(5):
        print(f"failed: {count} x {message}")
    report = dict(summary)
    report.update({"url": url, "model": model, "num_requests": len(workload), "concurrency": args.concurrency,
                   "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                   "input_len": list(input_len), "output_len": list(output_len), "seed": args.seed,
                   "errors": dict(errors)})
    emit_report(report, args.json)
    return report


def half_peak(args, url: str, model: str, workload) -> dict:
    from moejax.bench.harness import half_peak_latency
    from moejax.bench.loadgen import emit_report

    if not 1 <= args.idle_requests <= len(workload):
        raise UserError(f"--idle-requests {args.idle_requests}: need 1..{len(workload)} (--num-requests)")
    rep = half_peak_latency(url, model, workload, args.idle_requests, args.seed)
    print(f"p99 TTFT at half the peak rate / idle p99 TTFT: {rep['p99_ttft_half_over_idle_p99']:.2f} "
          f"(/ idle median: {rep['p99_ttft_half_over_idle_median']:.2f})")
    rep.update({"url": url, "model": model, "num_requests": len(workload), "input_len": args.input_len,
                "output_len": args.output_len, "seed": args.seed})
    emit_report(rep, args.json)
    return rep


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
