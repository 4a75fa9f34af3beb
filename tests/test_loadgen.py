"""The load generator: workloads, vLLM's metric definitions on hand-computed cases, and streaming
against a fake OpenAI server (Starlette + uvicorn in a thread). No JAX, no model."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from moejax.errors import UserError
from moejax.bench.loadgen import RequestResult, arrival_times, format_table, make_workload, run_load, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "bench_serve.py")
OVERLOADED, NO_IDS, HANGS = 13, 7, 99  # max_tokens values the fake server treats specially


def test_workload_is_deterministic_and_within_its_ranges():
    a = make_workload(200, (3, 9), (2, 5), seed=1)
    assert a == make_workload(200, (3, 9), (2, 5), seed=1)
    assert a != make_workload(200, (3, 9), (2, 5), seed=2)
    assert {len(p) for p, _ in a} == set(range(3, 10)) and {m for _, m in a} == set(range(2, 6))
    ids = {t for p, _ in a for t in p}
    assert min(ids) >= 32 and max(ids) <= 126  # printable ASCII: the prompts are also text
    small = {t for p, _ in make_workload(100, (5, 5), (1, 1), vocab_size=10) for t in p}
    assert small == set(range(3, 10))
    with pytest.raises(UserError, match="need 1 <= LO <= HI"):
        make_workload(4, (9, 3), (1, 1))
    # a shared prefix: every prompt starts with the same N tokens, then the same own tokens as without it
    shared = make_workload(200, (3, 9), (2, 5), seed=1, shared_prefix=20)
    assert len({tuple(p[:20]) for p, _ in shared}) == 1 and [(p[20:], m) for p, m in shared] == a
    # K prefixes: each prompt starts with one of K, the first of them the single prefix's
    several = make_workload(200, (3, 9), (2, 5), seed=1, shared_prefix=20, prefixes=5)
    heads = [tuple(p[:20]) for p, _ in several]
    assert len(set(heads)) == 5 and tuple(shared[0][0][:20]) in heads
    assert [(p[20:], m) for p, m in several] == a
    with pytest.raises(UserError, match="number of prefixes 0"):
        make_workload(4, (3, 9), (1, 1), shared_prefix=20, prefixes=0)


def test_poisson_arrivals_start_at_zero_with_mean_gap_one_over_rate():
    t = arrival_times(4000, 50.0, seed=3)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(np.mean(np.diff(t)) - 1 / 50) < 0.002
    assert np.array_equal(t, arrival_times(4000, 50.0, seed=3))
    assert not np.any(arrival_times(5, float("inf")))


def hand_made_results():
    return [RequestResult(10, 5, 0.1, [0.1, 0.1, 0.1, 0.1], 0.5, True, start_s=0.0),
            RequestResult(20, 3, 0.2, [0.2, 0.4], 0.8, True, start_s=0.1),
            RequestResult(30, 1, 0.3, [], 0.3, True, start_s=0.2),
            RequestResult(40, 0, None, [], 0.05, False, "HTTP 429: busy", start_s=0.3)]


def test_summary_follows_vllm_definitions_on_hand_computed_cases():
    s = summarize(hand_made_results(), 2.0)
    want = {"completed": 3, "failed": 1, "duration_s": 2.0, "total_input_tokens": 60, "total_output_tokens": 9,
            "request_throughput": 1.5, "output_throughput": 4.5, "total_token_throughput": 34.5,
            # TTFT [100, 200, 300] ms; p99 by linear interpolation at rank 0.99 * 2 = 1.98
            "mean_ttft_ms": 200, "median_ttft_ms": 200, "p99_ttft_ms": 298,
            # TPOT (0.5 - 0.1) / 4 and (0.8 - 0.2) / 2; the 1-token request has none
            "mean_tpot_ms": 200, "median_tpot_ms": 200, "p99_tpot_ms": 298,
            # ITL pooled: [100, 100, 100, 100, 200, 400]; p99 at rank 4.95
            "mean_itl_ms": 1000 / 6, "median_itl_ms": 100, "p99_itl_ms": 390,
            # E2EL [300, 500, 800]; p99 at rank 1.98
            "mean_e2el_ms": 1600 / 3, "median_e2el_ms": 500, "p99_e2el_ms": 794}
    assert s.keys() == want.keys()
    for k, v in want.items():
        assert s[k] == pytest.approx(v), k
    table = format_table(s)
    assert "Successful requests:                     3" in table
    assert "P99 ITL (ms):                            390.00" in table


def test_summary_of_nothing_completed_is_zeros():
    s = summarize(hand_made_results()[3:], 0.0)
    assert s["completed"] == 0 and s["failed"] == 1 and s["request_throughput"] == 0 and s["p99_ttft_ms"] == 0


# ---- a fake OpenAI streaming server ----

def fake_app(seen: list, in_flight: list):
    """Streams max_tokens tokens (the first chunk carries two ids, the others one), then a usage chunk
    and [DONE]. max_tokens OVERLOADED answers 429 with an error envelope, NO_IDS streams text without
    token_ids, HANGS never sends a token."""

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-moe", "object": "model", "max_model_len": 64}]})

    async def completions(request):
        body = await request.json()
        seen.append(body)
        n = body["max_tokens"]
        if n == OVERLOADED:
            return JSONResponse({"error": {"message": "server overloaded", "type": "ServiceUnavailable",
                                           "param": None, "code": 429}}, status_code=429)

        def chunk(choices, usage=None):
            payload = {"id": "cmpl-1", "object": "text_completion", "choices": choices, "usage": usage}
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            try:
                if n == HANGS:
                    await asyncio.sleep(30)
                yield ": ping\n\n"
                yield chunk([{"index": 0, "text": "", "prompt_token_ids": body["prompt"]}])  # no token: not TTFT
                sent = 0
                while sent < n:
                    await asyncio.sleep(0.01)
                    ids = [65 + sent % 26] * (2 if sent == 0 and n > 1 else 1)
                    sent += len(ids)
                    choice = {"index": 0, "text": "".join(map(chr, ids)), "finish_reason": None}
                    if n != NO_IDS:
                        choice["token_ids"] = ids
                    yield chunk([choice])
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                         "total_tokens": len(body["prompt"]) + n}
                yield chunk([], usage)
                yield "data: [DONE]\n\n"
            finally:
                in_flight[0] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def fake_server():
    seen, in_flight = [], [0, 0]  # request bodies; [requests streaming now, most at once]
    server = uvicorn.Server(uvicorn.Config(fake_app(seen, in_flight), host="127.0.0.1", port=0, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen, in_flight
    server.should_exit = True
    thread.join(10)


def test_streams_are_timed_and_counted_and_error_envelopes_are_read(fake_server):
    url, seen, in_flight = fake_server
    workload = [([72, 105], 4), ([1, 2, 3], OVERLOADED), ([5], 1), ([9, 9, 9, 9], NO_IDS), ([7] * 5, 6)]
    done = []
    in_flight[1] = 0
    results, duration = asyncio.run(run_load(url, "fake-moe", workload, concurrency=2, progress=done.append,
                                             timeout_s=30))
    assert len(done) == 5 and in_flight[1] <= 2  # the semaphore capped what was in flight
    body = next(b for b in seen if b["max_tokens"] == 4)
    assert body == {"model": "fake-moe", "prompt": [72, 105], "max_tokens": 4, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}, "return_token_ids": True}

    four, busy, one, no_ids, six = results
    assert not busy.ok and busy.error == "HTTP 429: server overloaded" and busy.prompt_tokens == 3
    for r, tokens, chunks in ((four, 4, 3), (one, 1, 1), (no_ids, NO_IDS, 6), (six, 6, 5)):
        assert r.ok and r.error == "", r.error
        assert r.output_tokens == tokens  # token_ids summed (two in the first chunk); usage when there are none
        assert len(r.itl_s) == chunks - 1  # a gap per token-carrying chunk after the first
        assert 0 < r.ttft_s <= r.latency_s and 0 <= r.start_s < duration
        assert r.latency_s == pytest.approx(r.ttft_s + sum(r.itl_s))  # E2EL ends at the last token
        assert r.latency_s >= 0.01 * chunks and min(r.itl_s, default=0) >= 0  # the server sleeps 10 ms a chunk
    s = summarize(results, duration)
    assert s["completed"] == 4 and s["failed"] == 1 and s["total_output_tokens"] == 4 + 1 + NO_IDS + 6


def test_the_run_timeout_cancels_open_requests(fake_server):
    url, _, _ = fake_server
    t = time.perf_counter()
    results, duration = asyncio.run(run_load(url, "fake-moe", [([1], 2), ([2], HANGS)], timeout_s=1.0))
    assert time.perf_counter() - t < 5 and 1.0 <= duration < 2.0
    assert results[0].ok and not results[1].ok and "timeout" in results[1].error


def test_unreachable_server_is_a_failed_request():
    results, _ = asyncio.run(run_load("http://127.0.0.1:1", "m", [([1], 2)], timeout_s=10))
    assert not results[0].ok and "ConnectError" in results[0].error


def bench(*args, timeout=60):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def test_bench_serve_reports_the_summary_as_its_last_line(fake_server, tmp_path):
    url, _, _ = fake_server
    out = tmp_path / "s.json"
    r = bench(url, "--num-requests", "6", "--concurrency", "3", "--input-len", "4,8", "--output-len", "2,5",
              "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["completed"] == 6 and last["model"] == "fake-moe" and "Mean TPOT (ms):" in r.stdout
    assert json.loads(out.read_text()) == last


@pytest.mark.parametrize("args, message", [
    (["http://127.0.0.1:1", "--input-len", "5"], "--input-len '5': expected LO,HI"),
    (["http://127.0.0.1:1", "--output-len", "9,3"], "need 1 <= LO <= HI"),
    (["http://127.0.0.1:1", "--concurrency", "x"], "invalid int value"),
    (["http://127.0.0.1:1"], "cannot reach http://127.0.0.1:1"),
    (["127.0.0.1:8000"], "expected http://HOST:PORT"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    r = bench(*args)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_serve_checks_the_model_and_its_length(fake_server):
    url, _, _ = fake_server
    r = bench(url, "--model", "other")
    assert r.returncode == 2 and "'other' is not served" in r.stderr and "fake-moe" in r.stderr, r.stderr
    r = bench(url, "--input-len", "16,60", "--output-len", "8,8")
    assert r.returncode == 2 and "max_model_len 64" in r.stderr, r.stderr


def test_the_load_generator_does_not_import_jax():
    code = "import sys; import moejax.bench.loadgen; assert 'jax' not in sys.modules, 'jax imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_warmup_primes_no_prompt_prefix_of_the_timed_rounds(monkeypatch):
    """bench compare's untimed warmup once sent the workload's own first prompts, so a prefix cache
    held exactly the first timed round's opening burst (its p99 TTFT 124-150 ms against 325-580 ms
    in later rounds): the warmup's prompts have the same lengths and share no cached block."""
    from types import SimpleNamespace

    from moejax.bench import harness
    from moejax.serving.prefix import block_names

    seen = []

    async def fake_load(url, model, workload, **kw):
        seen.append(workload)
        return [], 1.0
    monkeypatch.setattr(harness, "run_load", fake_load)
    monkeypatch.setattr(harness, "summarize", lambda results, wall: {})
    workload = make_workload(20, (16, 64), (4, 8), vocab_size=2048, seed=0, shared_prefix=32)
    run = harness.server_runner(SimpleNamespace(url="http://x", model="m"), workload, warmup=16)
    run()
    run()
    warm, first, second = seen
    assert first == second == workload and [len(p) for p, _ in warm] == [len(p) for p, _ in workload[:16]]
    cached = {b for p, _ in warm for b in block_names(p)}
    assert not any(b in cached for p, _ in workload for b in block_names(p))
