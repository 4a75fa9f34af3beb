"""Client-side load for an OpenAI-compatible completions server, and vLLM's serving metrics.

Definitions, as vLLM's benchmarks/serve.py computes them (times from the moment a request is sent,
after any wait for a concurrency slot):
  TTFT  time to the first streamed chunk that carries a token (non-empty text or token_ids)
  ITL   gaps between consecutive token-carrying chunks of a request; pooled over all requests
  E2EL  the request's latency: time to its last token-carrying chunk
  TPOT  (E2EL - TTFT) / (output tokens - 1), per request with more than one output token
Statistics cover completed requests only; throughputs divide by the run's wall time.
No JAX here: this runs in light client processes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from moejax.errors import UserError

if TYPE_CHECKING:
    import httpx

METRICS = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
           ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds; start_s is the send time relative to the
    run's start. ttft_s is None when no token arrived."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    itl_s: list[float]
    latency_s: float
    ok: bool
    error: str = ""
    start_s: float = 0.0


def _check_range(name: str, lo_hi: tuple[int, int]) -> tuple[int, int]:
    lo, hi = lo_hi
    if not 1 <= lo <= hi:
        raise UserError(f"{name} range {lo},{hi}: need 1 <= LO <= HI")
    return int(lo), int(hi)


def parse_range(flag: str, text: str) -> tuple[int, int]:
    """A command-line LO,HI range of lengths."""
    try:
        lo, hi = (int(p) for p in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected LO,HI, two integers, e.g. 16,512") from None
    if not 1 <= lo <= hi:
        raise UserError(f"{flag} {text}: need 1 <= LO <= HI")
    return lo, hi


def make_workload(num_requests: int, input_len: tuple[int, int] = (16, 512), output_len: tuple[int, int] = (8, 128),
                  vocab_size: int = 256, seed: int = 0, shared_prefix: int = 0, prefixes: int = 1
                  ) -> list[tuple[list[int], int]]:
    """`num_requests` (prompt token ids, max_tokens) pairs; both lengths uniform over their inclusive
    ranges; with `shared_prefix` N every prompt starts with the same N tokens (a system prompt),
    followed by its own input_len tokens; with `prefixes` K > 1, with one of K such prefixes, drawn
    uniformly per request (K system prompts, or K users' chat histories). Ids are printable ASCII
    (32..126) when vocab_size >= 256, so that the prompts are also valid text for a byte-level
    tokenizer, else 3..vocab_size-1 (above the usual special tokens).
    The same seed gives the same workload."""
    if num_requests < 1:
        raise UserError(f"number of requests {num_requests} must be >= 1")
    in_lo, in_hi = _check_range("input length", input_len)
    out_lo, out_hi = _check_range("output length", output_len)
    if shared_prefix < 0:
        raise UserError(f"shared prefix {shared_prefix} must be >= 0 tokens")
    if prefixes < 1:
        raise UserError(f"number of prefixes {prefixes} must be >= 1")
    if vocab_size < 4:
        raise UserError(f"vocabulary size {vocab_size} must be >= 4")
    id_lo, id_hi = (32, 126) if vocab_size >= 256 else (3, vocab_size - 1)
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(in_lo, in_hi + 1, size=num_requests)
    max_tokens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    shared = np.random.default_rng([seed, 1]).integers(id_lo, id_hi + 1, size=(prefixes, shared_prefix)).tolist()
    which = np.random.default_rng([seed, 2]).integers(0, prefixes, size=num_requests)
    return [(shared[k] + rng.integers(id_lo, id_hi + 1, size=int(n)).tolist(), int(m))
            for k, n, m in zip(which, prompt_lens, max_tokens)]


def arrival_times(num_requests: int, request_rate: float, seed: int = 0) -> np.ndarray:
    """Send times in seconds from the run's start of a Poisson process: the first at 0, then gaps
    drawn from an exponential of mean 1/request_rate. An infinite rate sends everything at 0."""
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    return np.concatenate(([0.0], np.cumsum(gaps)))[:num_requests]


def _error_message(body: bytes) -> str:
    """error.message of an OpenAI error envelope, else the body's text (shortened)."""
    try:
        err = json.loads(body)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:300] or "(empty body)"


async def _request(client: httpx.AsyncClient, url: str, body: dict, prompt_tokens: int, t0: float) -> RequestResult:
    """Send one streaming completion and time its chunks. Output tokens are counted from the
    chunks' token_ids when the server returns them, else taken from usage.completion_tokens, else
    one per token-carrying chunk."""
    st = time.perf_counter()
    ttft, itl, last = None, [], st
    ids_seen, id_count, token_chunks, usage_tokens = False, 0, 0, None

    def result(error: str) -> RequestResult:
        if ids_seen:
            n = id_count
        else:
            n = usage_tokens if usage_tokens is not None else token_chunks
        return RequestResult(prompt_tokens, n, ttft, itl, last - st, not error, error, st - t0)

    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                last = time.perf_counter()
                return result(f"HTTP {resp.status_code}: {_error_message(await resp.aread())}")
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):  # blank separators, ": ping" comments, other SSE fields
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("error"):
                    last = now
                    return result(f"error in stream: {_error_message(data.encode())}")
                has_token = False
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids")
                    if ids is not None:
                        ids_seen, id_count = True, id_count + len(ids)
                    has_token = has_token or bool(ids) or bool(choice.get("text"))
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if has_token:
                    token_chunks += 1
                    if ttft is None:
                        ttft = now - st
                    else:
                        itl.append(now - last)
                    last = now
            if not done:
                return result("stream ended before data: [DONE]")
            if ttft is None:
                last = time.perf_counter()
                return result("stream carried no token")
            return result("")
    except Exception as e:  # a refused connection, a dropped stream, a chunk that is not JSON
        last = time.perf_counter()
        return result(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


async def run_load(url: str, model: str, workload: list[tuple[list[int], int]], concurrency: int | None = None,
                   request_rate: float | None = None, seed: int = 0, timeout_s: float = 600.0,
                   progress: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send every (prompt ids, max_tokens) of `workload` to `url`/v1/completions as a greedy stream
    with ignore_eos. Requests arrive as a Poisson process at `request_rate` per second (None or inf:
    all at once) and at most `concurrency` are in flight (None: no cap). `progress(result)` is called
    as each request finishes. After `timeout_s` the requests still open are cancelled and recorded
    as failed. Returns the results in workload order and the run's wall time in seconds."""
    import httpx  # here, not at the top: the statistics also run where httpx is missing (peer_cb)

    rate = math.inf if request_rate is None else float(request_rate)
    if not rate > 0:
        raise UserError(f"request rate {request_rate} must be > 0 (inf: all at once)")
    if concurrency is not None and concurrency < 1:
        raise UserError(f"concurrency {concurrency} must be >= 1")
    if not timeout_s > 0:
        raise UserError(f"timeout {timeout_s} s must be > 0")
    endpoint = url.rstrip("/") + "/v1/completions"
    arrivals = arrival_times(len(workload), rate, seed)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    results: list[RequestResult | None] = [None] * len(workload)
    sent: list[float | None] = [None] * len(workload)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        async def one(i: int) -> None:
            prompt, max_tokens = workload[i]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            if slots is not None:
                await slots.acquire()
            try:
                sent[i] = time.perf_counter()
                results[i] = await _request(client, endpoint, body, len(prompt), t0)
            finally:
                if slots is not None:
                    slots.release()
            if progress is not None:
                progress(results[i])

        tasks = [asyncio.create_task(one(i)) for i in range(len(workload))]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            end = time.perf_counter()
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            end = t0

    for i, r in enumerate(results):
        if r is None:  # cancelled by the run's timeout, before or while it streamed
            start = end if sent[i] is None else sent[i]
            results[i] = RequestResult(len(workload[i][0]), 0, None, [], end - start, False,
                                       f"cancelled: the run's {timeout_s:g} s timeout", start - t0)
    return results, end - t0


def _stats(values_s: list[float]) -> tuple[float, float, float]:
    """(mean, median, p99) in milliseconds; all 0 for no values, as vLLM reports them."""
    ms = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1e3
    return float(np.mean(ms)), float(np.median(ms)), float(np.percentile(ms, 99))


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """vLLM's serving metrics over the completed requests (the module docstring defines them);
    throughputs are per second of `duration_s`. Keys: completed, failed, duration_s,
    request_throughput, output_throughput, total_token_throughput, total_input_tokens,
    total_output_tokens, and mean_/median_/p99_ + ttft/tpot/itl/e2el + _ms."""
    good = [r for r in results if r.ok]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    total_in = sum(r.prompt_tokens for r in good)
    total_out = sum(r.output_tokens for r in good)
    values = {
        "ttft": [r.ttft_s for r in good],
        "tpot": [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in good if r.output_tokens > 1],
        "itl": [gap for r in good for gap in r.itl_s],
        "e2el": [r.latency_s for r in good],
    }
    out = {"completed": len(good), "failed": len(results) - len(good), "duration_s": duration_s,
           "request_throughput": len(good) * per_s, "output_throughput": total_out * per_s,
           "total_token_throughput": (total_in + total_out) * per_s,
           "total_input_tokens": total_in, "total_output_tokens": total_out}
    for key, _, _ in METRICS:
        out[f"mean_{key}_ms"], out[f"median_{key}_ms"], out[f"p99_{key}_ms"] = _stats(values[key])
    return out


def format_table(summary: dict) -> str:
    """The summary as vLLM's benchmark prints it: 50 columns, labels left, values after column 41."""
    def row(label, value):
        return f"{label:<40} {value:.2f}" if isinstance(value, float) else f"{label:<40} {value}"

    lines = ["{:=^50}".format(" Serving Benchmark Result "),
             row("Successful requests:", summary["completed"]),
             row("Failed requests:", summary["failed"]),
             row("Benchmark duration (s):", summary["duration_s"]),
             row("Total input tokens:", summary["total_input_tokens"]),
             row("Total generated tokens:", summary["total_output_tokens"]),
             row("Request throughput (req/s):", summary["request_throughput"]),
             row("Output token throughput (tok/s):", summary["output_throughput"]),
             row("Total token throughput (tok/s):", summary["total_token_throughput"])]
    for key, title, short in METRICS:
        lines.append("{:-^50}".format(title))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(row(f"{name} {short} (ms):", summary[f"{stat}_{key}_ms"]))
    lines.append("=" * 50)
    return "\n".join(lines)


def emit_report(report: dict, path: str | None) -> None:
    """The report as the last stdout line (JSON), and into `path` when given."""
    print(json.dumps(report))
    if path:
        try:
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as e:
            raise UserError(f"--json {path}: cannot write ({e.strerror})") from None
