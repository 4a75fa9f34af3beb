"""/v1/chat/completions, /tokenize, /detokenize, /tokenizer_info and /v1/models on the app of serve.py
in process (one engine, configs/shakespeare-bpe.yaml's model with random weights and the BPE tokenizer
of data/shakespeare-bpe), read with the official `openai` client where it has a call for it."""

import json
import os

import pytest

from helpers import REPO, setup
from moejax.serving.api import Limits
from moejax.serving.protocol import ServedModel
from moejax.serving.request import Request, SamplingParams
from moejax.tokenizers.hf import HFTokenizer

CONFIG = "configs/shakespeare-bpe.yaml"
TOK = HFTokenizer(os.path.join(REPO, "data", "shakespeare-bpe"))
MAX_LEN, SLOTS, CHUNK = 128, 4, 32
KEY = "sesame"
EXPECTED = json.load(open(os.path.join(REPO, "tests", "data", "tokenizer-fixtures", "expected.json")))
MESSAGES = [{"role": "system", "content": "Answer in verse."},
            {"role": "user", "content": [{"type": "text", "text": "Who is there?"}]}]  # guidellm's parts form


class App:
    def __init__(self, tokenizer=TOK, limits=None):
        from starlette.testclient import TestClient

        from moejax.serving.api import create_app
        from moejax.serving.engine import Engine
        from moejax.serving.metrics import Metrics
        from moejax.serving.replicas import Router

        rs, m, params = setup(CONFIG, "1x1x1x1")
        self.engine = Engine(rs, m, params, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK, budget=2 * CHUNK)
        self.engine.start()
        served = ServedModel("bpe", MAX_LEN, 2048, tokenizer, "/ckpt/bpe")
        self.http = TestClient(create_app(Router([self.engine], SLOTS), Metrics("bpe", 1, SLOTS), served,
                                          limits or Limits(api_key=KEY, max_body_bytes=64 * 1024)))

    def post(self, path, body, key=KEY, raw=None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        return self.http.post(path, content=raw if raw is not None else json.dumps(body), headers=headers)


@pytest.fixture(scope="module")
def app():
    return App()


def client(app):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=app.http, max_retries=0)


def test_chat_stream_and_not_give_the_same_text(app):
    c = client(app)
    kw = dict(model="bpe", messages=MESSAGES, max_completion_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kw)
    msg = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert msg.message.role == "assistant" and msg.finish_reason == "length" and msg.message.content
    assert full.usage.completion_tokens == 12
    # the prompt is the template's rendering, tokenized without added specials (transformers' ids)
    system_user = next(x for x in EXPECTED["shakespeare-bpe"]["chat"] if x["name"] == "system_user")
    assert full.usage.prompt_tokens == len(system_user["ids"])
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    deltas = [ch.choices[0] for ch in chunks if ch.choices][1:]
    assert len(deltas) == 12  # one delta per token
    assert "".join(d.delta.content for d in deltas) == msg.message.content
    assert [d.finish_reason for d in deltas] == [None] * 11 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_logprobs_put_the_token_first(app):
    c = client(app)
    r = c.chat.completions.create(model="bpe", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:  # greedy: the token is its row's best, first and largest
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob == max(t.logprob for t in e.top_logprobs)
        assert e.bytes == list(e.token.encode())
    streamed = [ch.choices[0].logprobs for ch in c.chat.completions.create(
        model="bpe", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices and ch.choices[0].logprobs]
    assert [e.logprob for lp in streamed for e in lp.content] == [e.logprob for e in content]


def test_tokenize_detokenize_and_tokenizer_info(app):
    sys_user = next(x for x in EXPECTED["shakespeare-bpe"]["chat"] if x["name"] == "system_user")
    r = app.post("/tokenize", {"messages": sys_user["messages"]}, key=None).json()  # open, as vLLM's
    assert r["tokens"] == sys_user["ids"] and r["count"] == len(sys_user["ids"]) and r["max_model_len"] == MAX_LEN
    case = EXPECTED["shakespeare-bpe"]["encode"][0]
    r = app.post("/tokenize", {"prompt": case["text"], "return_token_strs": True}).json()
    assert r["tokens"] == case["ids_special"] and r["token_strs"] == [TOK.token_str(i) for i in case["ids_special"]]
    plain = app.post("/tokenize", {"prompt": case["text"], "add_special_tokens": False}).json()["tokens"]
    assert plain == case["ids_plain"]
    assert app.post("/detokenize", {"tokens": case["ids_special"]}).json() == {"prompt": case["decode_skip"]}
    info = app.http.get("/tokenizer_info").json()  # what lm-eval's remote tokenizer reads
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] == "<|bos|>" and "im_start" in info["chat_template"]
    model = app.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert (model["id"], model["root"], model["max_model_len"]) == ("bpe", "/ckpt/bpe", MAX_LEN)


def test_text_completions_use_the_tokenizer_and_its_eos_list(app):
    r = app.post("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "echo": True,
                                     "logprobs": 1, "ignore_eos": True}).json()["choices"][0]
    ids = TOK.encode("ROMEO:")  # <|bos|> added, as vLLM's text prompts
    assert r["logprobs"]["tokens"][:len(ids)] == [TOK.token_text(i) for i in ids]
    assert r["text"].startswith("ROMEO:")
    # every id of generation_config.json's eos list stops a sequence (unless ignore_eos)
    from moejax.serving.protocol import parse_completion

    served = ServedModel("bpe", MAX_LEN, 2048, TOK)
    _, _, params, _ = parse_completion({"prompt": "x"}, served)
    assert set(params.stop_token_ids) == {0, 3}
    _, _, params, _ = parse_completion({"prompt": "x", "ignore_eos": True}, served)
    assert params.stop_token_ids == ()


@pytest.mark.parametrize("body,status,param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ({"messages": [{"content": "no role"}]}, 400, "messages"),
    ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": MESSAGES, "chat_template": "{{ messages }}"}, 400, "chat_template"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": MESSAGES, "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ({"messages": MESSAGES, "model": "other"}, 404, "model"),
])
def test_bad_chat_requests_get_the_envelope_and_the_server_goes_on(app, body, status, param):
    r = app.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "\n" not in err["message"], err
    good = app.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


def test_keys_limits_and_a_model_without_a_template():
    import openai

    bytes_app = App(tokenizer=None, limits=Limits(api_key=KEY, max_body_bytes=2048))
    r = bytes_app.post("/v1/chat/completions", {"messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
    assert "--chat-template" in r.json()["error"]["message"]
    r = bytes_app.post("/v1/chat/completions", {"messages": MESSAGES}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=bytes_app.http,
                      max_retries=0).chat.completions.create(model="bpe", messages=MESSAGES)
    big = {"messages": [{"role": "user", "content": "x" * 4096}]}
    r = bytes_app.post("/v1/chat/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = bytes_app.post("/v1/chat/completions", None, raw=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = bytes_app.post("/v1/completions", {"prompt": "hi", "max_tokens": 1, "unknown_field": [1]})
    assert r.status_code == 200  # unknown fields are ignored, as OpenAI's server does


def test_stop_strings_work_on_text_across_token_boundaries():
    text = "Good morrow, sir. How fares the king?"
    ids = TOK.encode(text, add_special_tokens=False)
    stop = "sir. How"  # spans several tokens, starting inside one
    assert not any(stop in TOK.decode([i]) for i in ids)
    req = Request([1], SamplingParams(max_tokens=len(ids), stop=(stop,)), lambda ev: None, TOK.detokenizer([1]))
    shown = []
    for i in ids:
        ev = req.accept(i, None)
        shown.append(ev.text)
        if ev.finish_reason:
            break
    assert req.finish_reason == "stop" and "".join(shown) == "Good morrow, "
