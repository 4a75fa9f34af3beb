"""The engine's forward calls in process: a mixed step (the decode rows and the prompt chunks of
admitted requests in one forward) gives the same greedy tokens as separate extend and decode calls
and as infer.py's Generator, for requests joining while others decode; the token accounting
(prompt, decode, padding) is exact; a decode step reads only the attention span its rows need."""

import numpy as np
import pytest

from helpers import forward, setup
from moejax.ops.attention import spans
from moejax.serving.engine import Engine
from moejax.serving.request import Request, SamplingParams

CONFIG = "configs/tiny.yaml"
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(3, 256, size=n)]
           for i, n in enumerate((5, 17, 40, 3, 70, 9, 33, 12))]
NEW = [12, 3, 20, 7, 9, 16, 5, 11]


def run(eng: Engine, in_flight: int) -> dict[int, list[int]]:
    """Every prompt through `eng`, at most `in_flight` at a time: each finished request lets the
    next one join while the others decode. Greedy, float32, dropless."""
    out, finished = {}, []

    def emit(i):
        def on(ev):
            out.setdefault(i, []).extend(ev.token_ids)
            if ev.finish_reason:
                finished.append(i)
        return on

    pending = list(range(len(PROMPTS)))
    while pending or len(finished) < len(PROMPTS):
        while pending and len(out) - len(finished) < in_flight:
            i = pending.pop(0)
            out[i] = []
            eng.submit(Request(PROMPTS[i], SamplingParams(max_tokens=NEW[i], temperature=0, ignore_eos=True),
                               emit(i)))
        assert eng.step() or pending
    return out


@pytest.fixture(scope="module")
def reference():
    from moejax.inference.generate import Generator
    from moejax.inference.sampling import Sampling

    rs, m, params = setup(CONFIG, "1x1x1x1")
    gen = Generator(rs, m, params, 1, 72, 128)
    return [gen.generate([p], n, Sampling(), None)["generated_ids"][0] for p, n in zip(PROMPTS, NEW)]


def test_mixed_steps_equal_separate_calls_and_infer(reference):
    rs, m, params = setup(CONFIG, "1x2x2x2")  # one mesh, for the suite's time
    got, calls = {}, None
    for mixed in (False, True):
        eng = Engine(rs, m, params, slots=4, max_len=128, chunk=32, budget=64, mixed=mixed)
        got[mixed] = run(eng, in_flight=3)
        assert eng.steps["mixed" if mixed else "extend"] > 0 and eng.steps["extend" if mixed else "mixed"] == 0
        assert eng.tokens["prefill"] == sum(map(len, PROMPTS))
        assert eng.tokens["decode"] == sum(NEW) - len(NEW)  # each first token comes from its prompt's last chunk
        if mixed and calls is not None:  # fewer forwards: decode rows ride along with the chunks
            assert eng.steps["mixed"] + eng.steps["decode"] < calls
        calls = sum(eng.steps.values())
    assert [got[True][i] for i in range(len(PROMPTS))] == reference
    assert got[False] == got[True]


def test_token_accounting_is_exact():
    """One request, prompt 20 tokens, 4 new: a mixed call of 2 decode slots (padding: nothing
    decodes yet) and one chunk padded to 32, then 3 decode calls of 2 slots, 1 real token each."""
    from moejax.serving.metrics import Metrics

    rs, m, params = setup(CONFIG, "1x1x1x1")
    metrics = Metrics("tiny", 1, 2)
    eng = Engine(rs, m, params, slots=2, max_len=64, chunk=32, budget=32, metrics=metrics)
    events = []
    eng.submit(Request(list(range(3, 23)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                       events.append))
    while not (events and events[-1].finish_reason):
        assert eng.step()
    assert eng.steps == {"extend": 0, "mixed": 1, "decode": 3}
    assert eng.tokens == {"prefill": 20, "decode": 3, "computed": (2 + 32) + 3 * 2}
    text = metrics.render().decode()
    for kind, n in (("prefill", 20), ("decode", 3), ("padding", 17)):
        assert f'moejax:step_tokens_total{{engine="0",kind="{kind}",model_name="tiny"}} {n}.0' in text
    assert 'moejax:forward_calls_total{engine="0",kind="mixed",model_name="tiny"} 1.0' in text


def test_generation_across_attention_spans_equals_the_full_forward():
    """Decode and prompt chunks read the cache in spans of 128, 256, ... positions (chosen in the
    program by the furthest position its rows reach, per group of 4 decode rows). Generations crossing
    the 256 and the 128 boundaries, beside short ones: each greedy token is the argmax of the uncached
    forward."""
    assert spans(32) == [32] and spans(640) == [128, 256, 512, 640] and spans(2048)[-2:] == [1024, 2048]
    rs, m, params = setup(CONFIG, "1x1x1x1")
    eng = Engine(rs, m, params, slots=8, max_len=320, chunk=64, budget=256)
    # 8 slots: decode rows 0-3 and 4-7 each read their own span (DECODE_GROUP 4): rows 0-3 (slots are
    # given in order) cross 128, row 4 alone crosses 256, which its group's span must follow
    prompts = [[int(t) for t in np.random.default_rng(5).integers(3, 256, size=n)] for n in (120, 7, 30, 9, 250)]
    out = {}
    reqs = [Request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                    lambda ev, i=i: out.setdefault(i, []).extend(ev.token_ids)) for i, (p, n) in
            enumerate(zip(prompts, (14, 5, 6, 8, 12)))]
    for r in reqs:
        eng.submit(r)
    while not all(r.finish_reason for r in reqs):
        eng.step()
    seqs = [p + out[i] for i, p in enumerate(prompts)]
    width = max(map(len, seqs))  # one uncached forward of every sequence, padded at the end (causal)
    logits, _ = forward(CONFIG, "1x1x1x1", [s + [0] * (width - len(s)) for s in seqs])
    for i, p in enumerate(prompts):
        assert out[i] == np.argmax(logits[i, len(p) - 1:len(seqs[i]) - 1], axis=-1).tolist()
