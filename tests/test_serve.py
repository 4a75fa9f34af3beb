"""The real server (scripts/serve.py) on 127.0.0.1 in a subprocess, driven by the official openai
client and plain HTTP: completions, streaming, models, health, metrics, errors, disconnects, batch
invariance against the generation loop infer.py runs, dp replicas, and a drained stop."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import REPO, free_port_pair, setup, xla_cache_dir
from moejax.bench.harness import ServerProcess

CONFIG = "configs/tiny.yaml"
MAX_LEN = 128
pytestmark = pytest.mark.slow


class Server(ServerProcess):
    """serve.py on the tiny config in float32 (moejax/serving/harness.py), with /metrics readers."""

    def __init__(self, mesh: str, *flags: str):
        super().__init__("--mesh", mesh, "--config", CONFIG, "--dtype", "float32", "--max-len", str(MAX_LEN),
                         "--prefill-chunk", "32", "--prefill-budget", "32", *flags, startup_s=300,
                         env={"XLA_FLAGS": "", "MOEJAX_CACHE_DIR": xla_cache_dir()})

    def metrics(self) -> dict:
        """{(name, labels as a sorted tuple): value} from /metrics."""
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def total(self, name: str, **labels) -> float:
        return sum(v for (n, lab), v in self.metrics().items()
                   if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def server():
    s = Server("1x2x2x2", "--slots", "4", "--max-waiting", "4")
    yield s
    s.stop()


def client(s: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


def post(s: Server, body) -> httpx.Response:
    # json.dumps, not httpx's encoder: it writes NaN and lone surrogates, which the tests send
    return httpx.post(s.url + "/v1/completions", content=json.dumps(body), timeout=120,
                      headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of each prompt alone, from the Generator infer.py runs (float32, 1 device)."""
    from moejax.inference.generate import Generator
    from moejax.inference.sampling import Sampling

    rs, m, params = setup(CONFIG, "1x1x1x1")
    gen = Generator(rs, m, params, 1, 96, MAX_LEN)
    return lambda prompt, n: gen.generate([prompt], n, Sampling(), None)["generated_ids"][0]


PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(3, 256, size=n)]
           for i, n in enumerate((5, 17, 40, 3, 70, 9, 33, 12))]


def greedy(s: Server, prompt, n: int, stream=False) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    if not stream:
        r = post(s, body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]
    ids = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    return ids


def test_completion_stream_models_health_metrics(server):
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == ["tiny"]
    full = c.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.prompt_tokens == len("To be, or not") and full.usage.completion_tokens >= 1
    chunks = list(c.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.total("moejax:generation_tokens_total") >= 2 * full.usage.completion_tokens
    assert server.total("moejax:prompt_tokens_total") >= 2 * full.usage.prompt_tokens
    assert server.total("moejax:time_to_first_token_seconds_count") >= 2
    assert server.total("moejax:kv_slots_total") == 4
    assert server.total("moejax:num_requests_running") == 0


def test_batch_invariance_at_once_and_joining(server, reference):
    want = [reference(p, 24) for p in PROMPTS]
    got = [None] * len(PROMPTS)

    def one(i, stream):
        got[i] = greedy(server, PROMPTS[i], 24, stream)

    threads = [threading.Thread(target=one, args=(i, i % 2 == 0)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    # four start, four more join while those decode (once a running request has its first token)
    got = [None] * len(PROMPTS)
    before = server.total("moejax:time_to_first_token_seconds_count")
    threads = [threading.Thread(target=one, args=(i, True)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while server.total("moejax:time_to_first_token_seconds_count") == before and time.time() < deadline:
        time.sleep(0.01)
    late = [threading.Thread(target=one, args=(i, False)) for i in range(4, 8)]
    for t in late:
        t.start()
    for t in threads + late:
        t.join()
    assert got == want


def test_sampling_fields(server):
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 20, "temperature": 0.9, "top_p": 0.9,
            "top_k": 20, "seed": 11, "return_token_ids": True, "ignore_eos": True}
    a, b = post(server, body).json(), post(server, body).json()
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]  # a seed repeats its draws
    ids = a["choices"][0]["token_ids"]
    stop_at = ids[5]
    r = post(server, {**body, "stop_token_ids": [stop_at]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["token_ids"] == ids[: ids.index(stop_at) + 1]
    two = post(server, {**body, "n": 2, "prompt": [[5, 6, 7, 8], [9, 10]]}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][0]["token_ids"] == ids
    assert two["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in two["choices"])
    # a stop string ends the text before it
    text = post(server, {**body, "prompt": "abc", "temperature": 0}).json()["choices"][0]["text"]
    if len(text) > 3:
        cut = text[2:4]
        r = post(server, {**body, "prompt": "abc", "temperature": 0, "stop": [cut]}).json()["choices"][0]
        assert r["finish_reason"] == "stop" and r["text"] == text[: text.index(cut)]


BAD = [
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": MAX_LEN}, 400, "max_tokens"),  # prompt + max_tokens beyond the context
    ({"prompt": [1, 2, 999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_k": 1.5}, 400, "top_k"),
    ({"stop_token_ids": [300]}, 400, "stop_token_ids"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"stream": "yes"}, 400, "stream"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "\ud800"}, 400, "prompt"),
    ({"best_of": 2}, 400, "best_of"),
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[next(iter(c)) + str(st) for c, st, _ in BAD])
def test_bad_request_then_good(server, change, status, param):
    r = post(server, {"model": "tiny", "prompt": "Hi", "max_tokens": 4, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert len(greedy(server, [1, 2, 3], 3)) == 3  # and the server goes on


def test_not_json_and_unknown_route(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    neutral = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2, "best_of": 1, "logit_bias": {}, "top_k": 10**12,
               "temperature": 1e-9, "return_token_ids": True}
    r = post(server, neutral)  # neutral values of unsupported fields, a huge top_k, a tiny temperature
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy(server, [1, 2], 2)
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="other", prompt="x", max_tokens=1)


def test_queue_full_is_429_and_disconnect_frees_slot(server):
    aborted = server.total("moejax:request_success_total", finished_reason="abort")

    async def flood():
        async with httpx.AsyncClient(timeout=120) as h:
            body = {"model": "tiny", "prompt": [3] * 60, "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*(h.post(server.url + "/v1/completions", json=body) for _ in range(12)))

    replies = asyncio.run(flood())
    codes = [r.status_code for r in replies]
    assert codes.count(200) >= 8 and codes.count(429) >= 1, codes  # 4 slots + 4 waiting, the rest refused
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["code"] == "queue_full" and "--max-waiting" in refused["message"]
    # a streaming client that goes away after its first token frees its slot
    body = {"model": "tiny", "prompt": [4] * 8, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    deadline = time.time() + 30
    while server.total("moejax:request_success_total", finished_reason="abort") == aborted and time.time() < deadline:
        time.sleep(0.1)
    assert server.total("moejax:request_success_total", finished_reason="abort") == aborted + 1
    assert server.total("moejax:num_requests_running") == 0
    assert len(greedy(server, [1, 2], 2)) == 2


def test_background_warmup_serves_at_once_and_says_when_every_program_is_ready(reference):
    """--background-warmup: serving after the decode program; a prompt whose shape is still compiling
    waits for it and gets the tokens of the generation loop; a line on stdout says when the other
    programs are all compiled."""
    s = Server("1x1x1x1", "--slots", "2", "--background-warmup")
    try:
        assert greedy(s, PROMPTS[2], 6) == reference(PROMPTS[2], 6)
        ready = threading.Event()

        def read():
            for line in s.proc.stdout:
                s.lines.append(line)
                if "programs compiled in the background in" in line:
                    ready.set()
                    return
        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(240), "".join(s.lines)[-2000:]
    finally:
        s.stop()
    assert any(line.startswith("replica 0: the other ") for line in s.lines)


def test_dp_replicas_serve_and_sigterm_drains(reference):
    s = Server("2x1x2x2", "--slots", "4")
    try:
        got = [None] * 8

        def one(i):
            got[i] = greedy(s, PROMPTS[i], 10, stream=True)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [reference(p, 10) for p in PROMPTS]
        for e in ("0", "1"):
            assert s.total("moejax:generation_tokens_total", engine=e) > 0, e
        # prefix caching stays within a replica: a 41-token prompt (2 blocks) streams on replica 0 (the
        # idle tie goes to the lowest index); sent again meanwhile it goes to replica 1, which holds none
        # of its blocks; once both are done, a third goes to replica 0 and reuses them
        hits = {e: s.total("moejax:prefix_cache_hits_total", engine=e) for e in ("0", "1")}
        p = [int(t) for t in np.random.default_rng(9).integers(3, 256, size=41)]
        long = threading.Thread(target=greedy, args=(s, p, 80, True))
        long.start()
        deadline = time.time() + 60
        while s.total("moejax:num_requests_running", engine="0") < 1:
            assert time.time() < deadline, "the long request never ran on replica 0"
            time.sleep(0.02)
        assert greedy(s, p, 2) == reference(p, 2)
        long.join()
        assert greedy(s, p, 2) == reference(p, 2)
        assert s.total("moejax:prefix_cache_hits_total", engine="1") == hits["1"]
        assert s.total("moejax:prefix_cache_hits_total", engine="0") == hits["0"] + 32
        # SIGTERM while a request streams: it completes, then the server exits cleanly
        body = {"model": "tiny", "prompt": [7] * 10, "max_tokens": 80, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        ids, done = [], False
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
                    if len(ids) == 1:
                        s.terminate()
                done = done or line == "data: [DONE]"
        assert done and len(ids) == 80
    finally:
        code, out = s.stop()
    assert code == 0 and "stopped" in out, out[-2000:]


def test_bad_flags_exit_2():
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    for flags, needle in ((["--slots", "3", "--mesh", "1x1x1x2"], "--slots 3"),
                          (["--port", str(port), "--config", CONFIG], f"cannot listen on 127.0.0.1:{port}"),
                          (["--prefill-chunk", "20"], "--prefill-chunk 20"),
                          (["--prefix-pool", "-1"], "--prefix-pool -1"),
                          (["--max-len", "4096", "--config", CONFIG], "--max-len 4096")):
        r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "serve.py"), *flags], capture_output=True,
                           text=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_two_processes_serve_their_own_replicas(reference):
    """--coordinator: each process runs the engine of its own dp replica on port + process id."""
    coord = free_port_pair()
    port = free_port_pair()  # process i listens on port + i
    while port in (coord - 1, coord, coord + 1):
        port = free_port_pair()
    procs = []
    try:
        starts = [threading.Thread(target=lambda i=i: procs.append(Server(
            "2x1x2x2", "--slots", "4", "--port", str(port), "--coordinator", f"127.0.0.1:{coord}",
            "--num-processes", "2", "--process-id", str(i)))) for i in range(2)]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        assert sorted(p.url for p in procs) == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        for p in procs:
            assert greedy(p, PROMPTS[1], 8) == reference(PROMPTS[1], 8)
            engines = {dict(lab)["engine"] for (n, lab), v in p.metrics().items()
                       if n == "moejax:generation_tokens_total" and v > 0}
            own = "1" if p.url.endswith(f":{port + 1}") else "0"  # process i serves replica i only
            assert engines == {own}
    finally:
        for p in procs:
            p.terminate()
        results = [p.stop() for p in procs]
    assert [code for code, _ in results] == [0, 0], [out[-1500:] for _, out in results]
