"""`logprobs` and `echo` on /v1/completions, as vLLM answers them (what lm-evaluation-harness's
local-completions reads): the rows' format, the request rules, and the values against the float64
reference (tests/reference.py) through the app in process (its engine on a simulated mesh), with the
official openai client streaming and not."""

import json

import numpy as np
import pytest

import reference
from helpers import host_params, setup
from moejax.config.model import load_config
from moejax.serving.formats import logprobs_json
from moejax.serving.protocol import ApiError, ServedModel, decode_completion
from moejax.tokenizers import ByteTokenizer
from moejax.serving.request import Logprobs, Request, SamplingParams

CONFIG = "configs/tiny.yaml"
MAX_LEN, SLOTS, CHUNK = 96, 4, 16
TOL = 1e-5  # absolute, on float32 logprobs against the float64 reference's log-softmax
SERVED = ServedModel("tiny", MAX_LEN, 256)
# ASCII ids: each token's text is its own (bytes >= 128 all read "\ufffd" alone); 40 > 2 chunks of 16
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(1, 128, size=n)] for i, n in enumerate((7, 40, 23))]


# ---- without an engine -------------------------------------------------------------------------------

BYTES = ByteTokenizer(256)  # token texts of the byte vocabulary

def parse(body):
    return decode_completion(json.dumps({"model": "tiny", "prompt": [1, 2], **body}).encode(), SERVED, 8)


def test_request_rules():
    for bad, param in (({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
                       ({"logprobs": 1.5}, "logprobs"), ({"echo": 1}, "echo"), ({"max_tokens": 0}, "max_tokens"),
                       ({"max_tokens": 0, "echo": False}, "max_tokens"), ({"max_tokens": -1, "echo": True}, "max_tokens"),
                       ({"prompt_logprobs": 1}, "prompt_logprobs")):
        with pytest.raises(ApiError) as e:
            parse(bad)
        assert (e.value.status, e.value.param) == (400, param), bad
    _, _, p, opt = parse({"logprobs": 20, "echo": True, "max_tokens": 0})
    assert (p.logprobs, p.prompt_logprobs, p.max_tokens, opt["echo"]) == (20, 20, 0, True)
    _, _, p, opt = parse({"logprobs": 0})
    assert (p.logprobs, p.prompt_logprobs, opt["echo"]) == (0, None, False)
    _, _, p, opt = parse({"echo": True, "logprobs": None, "prompt_logprobs": None})
    assert (p.logprobs, p.prompt_logprobs, opt["echo"]) == (None, None, True)


def test_logprobs_json_format():
    # rows: token 65 ('A') with top [66, 65, 200, 201]; token 200 (not in its top) with top [66, 67]
    rows = Logprobs(np.array([65, 200]), np.array([-1.5, -np.inf], np.float32),
                    np.array([[66, 65, 200, 201], [66, 67, 0, 0]]),
                    np.array([[-0.5, -1.5, -3.0, -4.0], [-0.25, -2.0, -9.0, -9.0]], np.float32))
    out, end = logprobs_json(Logprobs(rows.token_ids, rows.logprobs, rows.top_ids[:, :2], rows.top_values[:, :2]),
                             BYTES, offset=0, first=72)
    assert out["tokens"] == ["H", "A", "\ufffd"] and out["text_offset"] == [0, 1, 2] and end == 3
    assert out["token_logprobs"] == [None, -1.5, -9999.0]  # -inf floored
    assert out["top_logprobs"] == [None, {"A": -1.5, "B": -0.5}, {"\ufffd": -9999.0, "B": -0.25, "C": -2.0}]
    assert list(out["top_logprobs"][1]) == ["A", "B"]  # the token first, then its top (deduplicated by id)
    out, _ = logprobs_json(rows, BYTES, offset=5)
    # 200 and 201 read the same text: one key, the later value (vLLM's dict)
    assert out["top_logprobs"][0] == {"A": -1.5, "B": -0.5, "\ufffd": -4.0} and out["text_offset"] == [5, 6]
    zero, _ = logprobs_json(Logprobs(rows.token_ids, rows.logprobs, rows.top_ids[:, :0], rows.top_values[:, :0]), BYTES)
    assert zero["top_logprobs"] == [{"A": -1.5}, {"\ufffd": -9999.0}]  # logprobs 0: the token alone


# ---- the app in process ------------------------------------------------------------------------------

class App:
    """The app of serve.py on one engine (4 slots, chunks of 16, 2 rows per call), its thread running."""

    def __init__(self, mesh: str):
        from starlette.testclient import TestClient

        from moejax.serving.api import create_app
        from moejax.serving.engine import Engine
        from moejax.serving.metrics import Metrics
        from moejax.serving.replicas import Router

        rs, m, params = setup(CONFIG, mesh)
        self.engine = Engine(rs, m, params, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, budget=2 * CHUNK)
        self.router = Router([self.engine], SLOTS)
        self.engine.start()
        self.http = TestClient(create_app(self.router, Metrics("tiny", 1, SLOTS), SERVED))

    def post(self, body):
        return self.http.post("/v1/completions", content=json.dumps({"model": "tiny", **body}),
                              headers={"Content-Type": "application/json"})

    def rows(self, prompt, k):
        """The engine's own rows (ids and values) for prompt, greedy, one token."""
        import threading

        events, done = [], threading.Event()
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=k, prompt_logprobs=k, ignore_eos=True)
        self.engine.submit(Request(prompt, params, lambda ev: (events.append(ev), ev.finish_reason and done.set())))
        assert done.wait(120)
        return events[0]


@pytest.fixture(scope="module")
def apps():
    made = {}

    def get(mesh):
        if mesh not in made:
            made[mesh] = App(mesh)
        return made[mesh]

    yield get
    for a in made.values():
        a.router.stop()


def ref_logprobs(tokens) -> np.ndarray:
    """log-softmax of the float64 reference's logits, [T, V]."""
    z = reference.forward(host_params(CONFIG), load_config(CONFIG), np.array([tokens]))[0]
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


def check_top(top: dict, want_lp: np.ndarray, chosen: int, k: int) -> float:
    """A top dict against the reference's distribution: the chosen token's text first; every key's value
    is that of a token of that text among the chosen and the reference's best k (to TOL); as many keys
    as those tokens have texts. Returns the largest error."""
    order = np.argsort(-want_lp)
    cands = [chosen] + [int(t) for t in order[:k] if t != chosen]
    assert next(iter(top)) == BYTES.token_text(chosen)
    assert set(top) == {BYTES.token_text(t) for t in cands}
    err = 0.0
    for key, value in top.items():
        err = max(err, min(abs(value - want_lp[t]) for t in cands if BYTES.token_text(t) == key))
    # a near tie at the k-th place may pick either: then the k-th value still matches the reference's
    assert err <= TOL or abs(np.sort(want_lp)[-k] - np.sort(want_lp)[-k - 1]) <= TOL, err
    return err


@pytest.mark.slow
def test_echo_logprobs_equal_the_reference(apps):
    mesh = "1x2x2x2"  # one mesh, for the suite's time
    app, k = apps(mesh), 5
    r = app.post({"prompt": PROMPTS, "max_tokens": 1, "temperature": 0, "logprobs": k, "echo": True, "seed": 1234,
                  "return_token_ids": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    worst = 0.0
    for prompt, c in zip(PROMPTS, choices):
        gen = c["token_ids"][0]
        lp = c["logprobs"]
        n = len(prompt)
        assert len(lp["token_logprobs"]) == n + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert c["text"].startswith("".join(map(chr, prompt)))
        assert lp["tokens"] == [BYTES.token_text(t) for t in prompt + [gen]]
        assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))
        want = ref_logprobs(prompt + [gen])  # row j: the distribution of token j + 1
        for j in range(1, n + 1):
            tok = (prompt + [gen])[j]
            worst = max(worst, abs(lp["token_logprobs"][j] - want[j - 1, tok]),
                        check_top(lp["top_logprobs"][j], want[j - 1], tok, k))
        # greedy: the generated token is the reference's best and its logprob the top one
        assert want[n - 1, gen] >= want[n - 1].max() - TOL
        if gen < 128:  # lm-eval's greedy test (bytes >= 128 share one text: a later one's value may replace it)
            assert lp["token_logprobs"][n] == max(lp["top_logprobs"][n].values())
        # the engine's rows by id: the chosen token is the top-1 of its row, the same float
        ev = app.rows(prompt, k)
        assert ev.token_ids == [gen] and ev.logprobs.top_ids[0, 0] == gen
        assert ev.logprobs.logprobs[0] == ev.logprobs.top_values[0, 0]
        assert (ev.prompt_logprobs.token_ids == prompt[1:]).all()
        pw = want[np.arange(n - 1), prompt[1:]]
        assert np.abs(ev.prompt_logprobs.logprobs - pw).max() <= TOL
        top_want = np.take_along_axis(want[: n - 1], ev.prompt_logprobs.top_ids, -1)
        assert np.abs(ev.prompt_logprobs.top_values - top_want).max() <= TOL  # each id's value
        assert np.abs(ev.prompt_logprobs.top_values - -np.sort(-want[: n - 1])[:, :k]).max() <= TOL  # the best k
    assert worst <= TOL
    print(f"{mesh}: max |logprob - reference| = {worst:.2e}")


@pytest.mark.slow
def test_score_only_and_bad_requests(apps):
    app = apps("1x1x1x1")
    prompt = PROMPTS[1]
    good = {"prompt": [prompt, PROMPTS[0]], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = app.post(good)
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    assert c["text"] == "".join(map(chr, prompt)) and c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(prompt) + len(PROMPTS[0])
    lp = c["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) and lp["token_logprobs"][0] is None
    want = ref_logprobs(prompt)
    assert max(abs(lp["token_logprobs"][j] - want[j - 1, prompt[j]]) for j in range(1, len(prompt))) <= TOL
    # the same rows as echo with a token generated (those rows first)
    r1 = app.post({**good, "max_tokens": 1}).json()["choices"][0]["logprobs"]
    assert r1["token_logprobs"][:-1] == lp["token_logprobs"] and r1["top_logprobs"][:-1] == lp["top_logprobs"]
    # echo without logprobs: the text only
    r = app.post({"prompt": "Hi", "max_tokens": 0, "echo": True}).json()["choices"][0]
    assert (r["text"], r["logprobs"]) == ("Hi", None)
    for bad, param in (({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
                       ({"echo": False}, "max_tokens"), ({"echo": "yes"}, "echo")):
        r = app.post({**good, **bad})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
        assert app.post(good).json()["choices"][0]["logprobs"] == lp  # and the server goes on


@pytest.mark.slow
def test_openai_client_stream_and_not(apps):
    import openai

    app = apps("1x1x1x1")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=app.http, max_retries=0)
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3, echo=True,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    lp = full.logprobs
    n = len(PROMPTS[2])
    assert len(lp.token_logprobs) == n + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(n, n + 6):  # greedy: each generated token is its row's best (its text its own: < 128)
        if len(lp.tokens[j]) == 1 and ord(lp.tokens[j]) < 128:
            assert lp.token_logprobs[j] == max(lp.top_logprobs[j].values())
    chunks = [ch.choices[0] for ch in client.completions.create(**kw, stream=True) if ch.choices]
    assert len(chunks) == 6  # one per token; the first carries the prompt
    assert "".join(ch.text for ch in chunks) == full.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(ch.logprobs, field) for ch in chunks), []) == getattr(lp, field), field
    assert len(chunks[0].logprobs.tokens) == n + 1 and all(len(ch.logprobs.tokens) == 1 for ch in chunks[1:])
    # without echo: the generated rows only, offsets from 0
    plain = client.completions.create(**{**kw, "echo": False}).choices[0].logprobs
    # the echo request ran the extend program, this one a mixed step (and the echo's cached prefix):
    # other matmul shapes, so equal up to float32 rounding (the reference bound, 1e-5)
    np.testing.assert_allclose(plain.token_logprobs, lp.token_logprobs[n:], rtol=0, atol=1e-5)
    assert plain.text_offset[0] == 0
