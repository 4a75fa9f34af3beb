"""Generation and `moejax infer`: the report's values against an independent computation,
sampling's promises on a crafted distribution, EOS stopping, the drop and reroute policies through
infer.py on a multi-device mesh, the float16 -> bfloat16 fallback, kv heads a mesh does not divide,
random weights labelled as such."""

import json

import jax
import numpy as np
import pytest

import reference
from helpers import host_params, run_script, setup
from moejax.config.model import load_config
from moejax.inference.generate import Generator
from moejax.inference.sampling import Sampling, sample
from moejax.tokenizers.bytes import decode

PROMPTS = [[5, 17, 99, 3, 250, 7], [42, 42, 1, 200]]


def _reference_greedy(prompt, n_new, config="tiny"):
    """Greedy continuation by full float64 recomputation (tests/reference.py), one token at a time."""
    cfg, params = load_config(config), host_params(config)
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(reference.forward(params, cfg, np.array([seq]))[0, -1])))
    return seq[len(prompt):]


def _json(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_infer_json_values_match_an_independent_computation():
    r = run_script("infer.py", "--mesh", "1x2x2x2", "--config", "tiny", "--prompt-ids", json.dumps(PROMPTS),
                   "--max-new-tokens", "5", "--json")
    rep = _json(r)
    cfg = load_config("tiny")
    assert rep["generated_ids"] == [_reference_greedy(p, 5) for p in PROMPTS]
    assert rep["params_total"] == sum(v.size for v in host_params("tiny").values())
    assert rep["devices"] == 8 and rep["mesh"] == {"dp": 1, "pp": 2, "tp": 2, "ep": 2}
    fed = sum(len(p) for p in PROMPTS) + sum(len(g) - 1 for g in rep["generated_ids"])  # the last token is not fed
    assert rep["moe"]["assignments"] == cfg.num_layers * cfg.experts_per_token * fed
    assert rep["moe"]["dropped"] == 0 and rep["moe"]["rerouted"] == 0
    assert rep["prompt_tokens"] == 10 and rep["new_tokens"] == 10
    assert rep["prefill_tokens_per_s"] == pytest.approx(10 / rep["ttft_s"])
    assert rep["weights"] == "random (seed 0)"
    assert "TTFT" in r.stdout and "decoding 4/4" in r.stderr
    shown = [x for x in r.stdout.splitlines() if x.startswith("[")]
    assert len(shown) == 2 and all(x.endswith(" [random weights (seed 0), no --ckpt: not a trained model]")
                                   for x in shown), shown


def test_ids_past_the_byte_range_show_instead_of_vanishing():
    assert decode([72, 105, 28180, 33, 300]) == "Hi<28180>!<300>"
    assert decode([0xE2, 0x82, 0xAC]) == "\u20ac"  # multi-byte UTF-8 still decodes


def _sample_many(logits_V, n, seed, **opts):
    logits = jax.numpy.asarray(np.tile(np.asarray(logits_V, np.float32), (n, 1)))
    return np.asarray(sample(logits, jax.random.key(seed), **opts))


# a crafted distribution: probabilities 0.4, 0.3, 0.2, 0.06, 0.04 (then nothing)
_P = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
_LOGITS = np.concatenate([np.log(_P), [-1e9] * 3])


@pytest.mark.parametrize("top_k, top_p, support", [(2, 1.0, {0, 1}), (0, 0.65, {0, 1}), (0, 0.75, {0, 1, 2}),
                                                   (4, 0.95, {0, 1, 2, 3}), (0, 1.0, {0, 1, 2, 3, 4})])
def test_top_k_and_top_p_sample_exactly_their_support_in_proportion(top_k, top_p, support):
    got = _sample_many(_LOGITS, 4000, 0, temperature=1.0, top_k=top_k, top_p=top_p)
    assert set(got.tolist()) == support  # never outside, and every token of the support shows
    want = _P[sorted(support)] / _P[sorted(support)].sum()
    freq = np.bincount(got, minlength=8)[sorted(support)] / got.size
    assert np.max(np.abs(freq - want)) < 0.04  # 4000 draws: standard error <= 0.008


def test_sampling_seeds_and_the_greedy_limit():
    a = _sample_many(_LOGITS, 64, 1, temperature=1.0, top_k=0, top_p=1.0)
    b = _sample_many(_LOGITS, 64, 1, temperature=1.0, top_k=0, top_p=1.0)
    c = _sample_many(_LOGITS, 64, 2, temperature=1.0, top_k=0, top_p=1.0)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    rows = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32)
    cold = np.asarray(sample(jax.numpy.asarray(rows), jax.random.key(3), temperature=1e-3, top_k=0, top_p=1.0))
    assert cold.tolist() == np.argmax(rows, -1).tolist()  # temperature -> 0 is greedy


@pytest.fixture(scope="module")
def gen():
    rs, m, params = setup("tiny", "1x1x1x1")
    return Generator(rs, m, params, len(PROMPTS), 6, 6 + 12)


def test_generation_with_the_same_seed_repeats_and_another_seed_differs(gen):
    run = [gen.generate(PROMPTS, 12, Sampling(temperature=1.0, seed=s), eos_id=None)["generated_ids"]
           for s in (7, 7, 8)]
    assert run[0] == run[1] and run[0] != run[2]


def test_generation_stops_at_eos_and_keeps_it(gen):
    free = gen.generate(PROMPTS, 10, Sampling(), eos_id=None)["generated_ids"]
    eos = free[0][2]  # a token the first sequence emits third
    got = gen.generate(PROMPTS, 10, Sampling(), eos_id=eos)
    want = [g[: g.index(eos) + 1] if eos in g else g for g in free]
    assert got["generated_ids"] == want and len(want[0]) <= 3
    assert got["new_tokens"] == sum(len(w) for w in want)


@pytest.mark.slow
def test_drop_and_reroute_through_infer_on_a_multi_device_mesh():
    common = ["--mesh", "1x1x1x2", "--config", "tiny", "--prompt-ids", json.dumps(PROMPTS), "--max-new-tokens", "3",
              "--capacity-factor", "0.3", "--moe-kernel", "buffers", "--json"]  # not timing the kernels
    drop = _json(run_script("infer.py", *common, "--capacity-policy", "drop"))
    reroute = _json(run_script("infer.py", *common, "--capacity-policy", "reroute"))
    assert drop["capacity_policy"] == "drop" and drop["capacity_factor"] == 0.3 and drop["devices"] == 2
    assert drop["moe"]["dropped"] > 0 and drop["moe"]["rerouted"] == 0
    assert reroute["moe"]["rerouted"] > 0 and reroute["moe"]["dropped"] < drop["moe"]["dropped"]
    for rep in (drop, reroute):
        assert [len(g) for g in rep["generated_ids"]] == [3, 3]
        assert all(0 <= t < 256 for g in rep["generated_ids"] for t in g)


def test_float16_config_computes_in_bfloat16_on_cpu_and_says_so(tmp_path):
    cfg = tmp_path / "tiny-f16.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("param_dtype: float32", "param_dtype: float16"))
    r = run_script("infer.py", "--mesh", "1x1x1x1", "--config", str(cfg), "--prompt-ids", "[[1, 2, 3]]",
                   "--max-new-tokens", "2", "--json")
    rep = _json(r)
    assert "computing in bfloat16: XLA:CPU has no native float16 matmul (pass --dtype float16 to insist)" in r.stdout
    assert "1,266,240 parameters, 2.53 MB in bfloat16" in r.stdout and rep["generated_ids"] and rep["devices"] == 1


def test_a_mesh_that_does_not_divide_the_kv_heads_is_refused():
    r = run_script("infer.py", "--plan", "--mesh", "1x1x8x1", "--config", "tiny", timeout=60)  # 8 heads, 4 kv heads
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "num_kv_heads=4 is not divisible by the 8 kv_heads shards" in r.stderr, r.stderr
