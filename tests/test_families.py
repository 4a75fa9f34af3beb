"""Model families beside Mixtral, each against transformers' own numbers (tests/data/hf-*-tiny, made by
scripts/hf_family_fixtures.py): logits within 1e-5 relative on several meshes and both layouts (2x2x1x2:
a stage holding a dense and a MoE layer in the 4-layer fixtures; GPT-OSS's 2 layers: a sliding-window
stage and a full-attention one), greedy tokens, the training loss terms and gradients, export round
trips, the fused expert layout; each term a family adds is shown to matter."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO, RTOL, import_fixture, rel_err, run_script
from moejax.checkpoint import store as checkpoint
from moejax.inference.generate import Generator, put, round_up
from moejax.inference.sampling import Sampling
from moejax.models import counts, registry
from moejax.models import transformer as model
from moejax.models.params import param_shapes
from moejax.models.runspec import RunSpec
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout
from moejax.training.loss import Scorer

DATA = os.path.join(REPO, "tests", "data")
QWEN3 = os.path.join(DATA, "hf-qwen3-moe-tiny")
FIXTURES = {"qwen3_moe": QWEN3, "olmoe": os.path.join(DATA, "hf-olmoe-tiny"),
            "qwen2_moe": os.path.join(DATA, "hf-qwen2-moe-tiny"), "glm4_moe": os.path.join(DATA, "hf-glm4-moe-tiny"),
            "gpt_oss": os.path.join(DATA, "hf-gpt-oss-tiny"), "deepseek_v3": os.path.join(DATA, "hf-deepseek-v3-tiny")}
GRAD_RTOL = 1e-4  # per tensor: max |got - want| / max |want|, as for Mixtral (tests/test_train.py)
FAMILIES = sorted(FIXTURES)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each family's fixture imported as a moejax checkpoint (once per module)."""
    return {family: import_fixture(tmp_path_factory, hf, family) for family, hf in FIXTURES.items()}


@pytest.fixture(scope="module")
def qwen3(imported):
    return imported["qwen3_moe"]


def _ref(family):
    return np.load(os.path.join(FIXTURES[family], "reference.npz"))


def _restore(ckpt, mesh_text, layout="seed", change=None):
    """(RunSpec, mesh, serving params) of a checkpoint, float32."""
    shape, lay = parse_mesh(mesh_text), load_layout(layout)
    m = make_mesh(shape)
    cfg, stacked, _ = checkpoint.restore(ckpt, m, lay)
    if change:  # a term taken away: its tensors too (a term's field set to its neutral value keeps them)
        cfg = change(cfg)
        stacked = {k: v for k, v in stacked.items() if k in param_shapes(cfg)}
    rs = RunSpec(cfg, lay, shape, "float32")
    return rs, m, model.serving_params(stacked, rs, m)


def _forward(ckpt, mesh_text, layout="seed", change=None):
    rs, m, params = _restore(ckpt, mesh_text, layout, change)
    lay = rs.layout
    ids = np.load(os.path.join(QWEN3, "reference.npz"))["input_ids"].astype(np.int32)  # the same in every fixture
    b = round_up(ids.shape[0], rs.batch_multiple)  # rows past the prompts: padding, length 0
    tokens = np.zeros((b, ids.shape[1]), np.int32)
    tokens[:len(ids)] = ids
    lengths = np.where(np.arange(b) < len(ids), ids.shape[1], 0).astype(np.int32)
    logits, _ = model.build(rs, m, "forward")(params, put(m, lay, "tokens", tokens), put(m, lay, "lengths", lengths))
    return rs, m, params, np.asarray(logits)[:len(ids)]


@pytest.mark.parametrize("family,want,params", [
    ("qwen3_moe", ("head", True, 32, 16, 0.001), 181_696),  # head_dim decoupled from d_model / heads
    ("olmoe", ("proj", False, 16, 16, 0.01), 157_184),
    ("qwen2_moe", ("none", False, 16, 16, 0.001), 271_104),
    ("glm4_moe", ("head", True, 32, 16, 0.0), 324_928 + 3 * 8),  # + the correction biases (HF buffers)
    ("gpt_oss", ("none", True, 32, 16, 0.01), 184_280),
    ("deepseek_v3", ("none", True, 24, 16, 0.0), 435_968 + 3 * 16)])  # head_dim: nope 16 + rope 8
def test_a_checkpoint_imports_as_its_own_family(imported, family, want, params):
    cfg = checkpoint.config_of(checkpoint.read_meta(imported[family])[0])
    assert cfg.family == family
    assert (cfg.qk_norm, cfg.norm_topk_prob, cfg.head_dim, cfg.d_model // cfg.num_heads, cfg.router_aux_loss_coef) == want
    assert counts.param_count(cfg) == params  # what transformers counted


# every family on 1x2x2x2 (pipeline stages, heads and experts all split), and on one of the other three
# meshes, each of which two families take (the suite's time: 24 runs of ~9 s took 3.6 min)
SECOND_MESH = {"deepseek_v3": ("1x1x2x2", "ep-tp"), "glm4_moe": ("1x1x2x2", "ep-tp"), "gpt_oss": ("2x2x1x2", "seed"),
               "qwen2_moe": ("2x2x1x2", "seed"), "olmoe": ("1x1x1x1", "seed"), "qwen3_moe": ("1x1x1x1", "seed")}


@pytest.mark.parametrize("family,mesh,layout", [(f, "1x2x2x2", "seed") for f in FAMILIES]
                         + [(f, *SECOND_MESH[f]) for f in FAMILIES])
def test_family_logits_equal_transformers(imported, family, mesh, layout):
    assert rel_err(_forward(imported[family], mesh, layout)[3], _ref(family)["logits"]) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_tokens_equal_transformers(imported, family):
    ref = _ref(family)
    rs, m, params, _ = _forward(imported[family], "1x2x2x2")
    prompts = ref["input_ids"].astype(np.int32).tolist()
    gen = Generator(rs, m, params, len(prompts), len(prompts[0]), len(prompts[0]) + 12)
    assert gen.generate(prompts, 12, Sampling(), eos_id=None)["generated_ids"] == ref["generated_ids"].tolist()


@pytest.mark.parametrize("family,mesh,ring", [("gpt_oss", "1x2x2x2", []), ("gpt_oss", "1x1x2x2", [8, 48]),
                                              ("deepseek_v3", "1x2x2x2", [])])  # attention of their own
def test_family_serving_steps_equal_transformers(imported, family, mesh, ring):
    """The engine's programs (prompt chunks of 16, a mixed step of one request's decode row and the
    other's chunk, decode steps past the window) give transformers' greedy tokens. GPT-OSS on 1x2x2x2:
    one stage's layer slides (window 8) and the other's attends fully, so their slot keeps whole rows;
    on 1x1x2x2 the sliding layer keeps a ring of its 8 positions (`ring`: each layer's cache length),
    which a chunk of 16 overruns, and prefix caching is off."""
    from moejax.serving.engine import Engine
    from moejax.serving.request import Request, SamplingParams

    ref = _ref(family)
    rs, m, params = _restore(imported[family], mesh)
    eng = Engine(rs, m, params, slots=2, max_len=48, chunk=16, budget=16)
    assert eng.ring == bool(ring) and eng.prefix.enabled != bool(ring)
    if ring:
        assert [buf.shape[2] for buf in eng.programs.cache[0]] == ring == [buf.shape[2] for buf in eng.programs.cache[1]]
    prompts, out, done = ref["input_ids"].tolist(), {}, []

    def submit(i):
        def on(ev):
            out.setdefault(i, []).extend(ev.token_ids)
            done.extend([i] if ev.finish_reason else [])
        eng.submit(Request(prompts[i], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), on))

    submit(0)
    while not out.get(0):  # the first request decodes before the second is admitted
        eng.step()
    submit(1)
    while len(done) < 2:
        eng.step()
    assert [out[0], out[1]] == ref["generated_ids"].tolist() and eng.steps["mixed"] > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loss_terms_and_gradients_equal_transformers(imported, family):
    """On 1x2x2x2 (dense and MoE layers on each stage where the fixture has both): CE and aux loss
    within 1e-5 of transformers', and d loss / d every tensor against torch autograd, mapped through the
    family's HF names. The correction bias has no gradient (transformers keeps it as a buffer; moejax
    trains it by a rule)."""
    import jax

    from moejax.checkpoint.hf import units
    from moejax.inference.generate import put

    ref, want = _ref(family), np.load(os.path.join(FIXTURES[family], "grads.npz"))
    shape, lay = parse_mesh("1x2x2x2"), load_layout("seed")
    m = make_mesh(shape)
    cfg, stacked, _ = checkpoint.restore(imported[family], m, lay)
    rs = RunSpec(cfg, lay, shape, "float32", training=True)
    scorer = Scorer(rs, m)
    ids = ref["input_ids"].astype(np.int32)
    toks = np.zeros((round_up(len(ids), rs.batch_multiple), ids.shape[1]), np.int32)
    toks[:len(ids)] = ids
    lens = np.where(np.arange(len(toks)) < len(ids), ids.shape[1], 0).astype(np.int32)
    grads, got = jax.jit(jax.grad(scorer.loss_of, has_aux=True))(stacked, put(m, lay, "tokens", toks),
                                                                 put(m, lay, "lengths", lens))
    got = {k: float(v) for k, v in got.items()}
    assert abs(got["ce_loss"] - float(ref["ce_loss"])) <= 1e-5 * float(ref["ce_loss"])
    if np.isnan(ref["aux_loss"]):  # GLM-4.5 has no load-balancing loss: the total is the CE
        assert cfg.router_aux_loss_coef == 0 and got["loss"] == got["ce_loss"]
    else:
        assert abs(got["aux_loss"] - float(ref["aux_loss"])) <= 1e-5 * float(ref["aux_loss"])
    expect = {n: np.zeros(g.shape, np.float32) for n, g in grads.items()}
    for (name, idx), (hf_name, fn) in units(cfg).items():
        expect[name][idx] = fn(want[hf_name]) if hf_name in want.files else 0.0
    for name, g in grads.items():
        g, e = np.asarray(g), expect[name]
        scale = np.max(np.abs(e))
        assert (scale == 0 and not np.any(g)) or np.max(np.abs(g - e)) <= GRAD_RTOL * scale, name


@pytest.mark.parametrize("family,term,change", [
    ("qwen3_moe", "per-head QK-norm", lambda c: dataclasses.replace(c, qk_norm="none")),
    ("qwen3_moe", "norm_topk_prob", lambda c: dataclasses.replace(c, norm_topk_prob=False)),
    ("olmoe", "QK-norm over the projection", lambda c: dataclasses.replace(c, qk_norm="none")),
    ("olmoe", "raw top-k weights", lambda c: dataclasses.replace(c, norm_topk_prob=True)),
    ("olmoe", "clip_qkv", lambda c: dataclasses.replace(c, clip_qkv=0.1)),
    ("qwen2_moe", "q/k/v biases", lambda c: dataclasses.replace(c, attention_bias=False)),
    ("qwen2_moe", "the shared expert's gate", lambda c: dataclasses.replace(c, shared_expert_gate=False)),
    ("qwen2_moe", "linear RoPE scaling", lambda c: dataclasses.replace(c, rope_scaling=())),
    ("glm4_moe", "partial RoPE", lambda c: dataclasses.replace(c, partial_rotary_factor=1.0)),
    ("glm4_moe", "yarn RoPE", lambda c: dataclasses.replace(c, rope_scaling=())),
    ("glm4_moe", "the group mask", lambda c: dataclasses.replace(c, n_group=1, topk_group=1)),
    ("glm4_moe", "the routed scale", lambda c: dataclasses.replace(c, routed_scaling_factor=1.0)),
    ("glm4_moe", "the shared expert", lambda c: dataclasses.replace(c, shared_expert_ffn=0)),
    ("glm4_moe", "the correction bias", "zero router_bias"),
    ("gpt_oss", "attention sinks", lambda c: dataclasses.replace(c, attention_sinks=False)),
    ("gpt_oss", "the sliding window", lambda c: dataclasses.replace(c, layer_types=())),
    ("gpt_oss", "the window's last position", lambda c: dataclasses.replace(c, sliding_window=c.sliding_window + 1)),
    ("gpt_oss", "gate and up interleaved", "gate and up as halves"),
    ("gpt_oss", "the clamp", lambda c: dataclasses.replace(c, swiglu_limit=None)),
    ("deepseek_v3", "yarn's mscale in the softmax scale", "plain softmax scale"),
    ("deepseek_v3", "interleaved RoPE", lambda c: dataclasses.replace(c, rope_interleave=False)),
    ("deepseek_v3", "the correction bias", "zero router_bias"),
    ("deepseek_v3", "the shared experts", lambda c: dataclasses.replace(c, shared_expert_ffn=0)),
    ("deepseek_v3", "the group mask", lambda c: dataclasses.replace(c, n_group=1, topk_group=1)),
])
def test_each_term_a_family_adds_matters(imported, monkeypatch, family, term, change):
    """Without the term (or with it where the family has none) the logits are far from
    transformers': the fixture exercises it."""
    monkeypatch.setitem(registry.FAMILIES, family, dataclasses.replace(registry.FAMILIES[family], fixed=()))
    if change == "zero router_bias":
        monkeypatch.setattr(checkpoint, "restore", _zero_after(checkpoint.restore, "router_bias"))
        change = None
    if change == "plain softmax scale":  # head_dim^-0.5 without yarn's mscale^2 (the RoPE tables keep theirs)
        from moejax.ops import mla
        monkeypatch.setattr(mla, "softmax_scale", lambda cfg: cfg.head_dim ** -0.5)
        change = None
    if change == "gate and up as halves":  # HF's gate_up_proj read as [gate | up], Mixtral's fused layout
        monkeypatch.setattr(checkpoint, "restore", _halves_after(checkpoint.restore))
        change = None
    # at least 100x the equality bound (measured 830x for linear RoPE scaling on the tiny model, whose
    # random attention weights depend little on position; 1000x and more for the other terms). One
    # device: each term's sharded form is what the logits tests check on two meshes per family.
    assert rel_err(_forward(imported[family], "1x1x1x1", change=change)[3], _ref(family)["logits"]) > 1e2 * RTOL, term


def _zero_after(restore, name):
    def zeroed(*a, **k):
        cfg, params, meta = restore(*a, **k)
        return cfg, {**params, name: params[name] * 0}, meta
    return zeroed


def _halves_after(restore):
    """w1, w3 (and b1, b3) as the first and second halves of the HF tensor they interleave."""
    def halves(*a, **k):
        cfg, params, meta = restore(*a, **k)
        params = dict(params)
        for gate, up in (("w1", "w3"), ("b1", "b3")):
            g, u = np.asarray(params[gate]), np.asarray(params[up])
            both = np.stack([g, u], -1).reshape(g.shape[:-1] + (-1,))  # the HF tensor
            params[gate], params[up] = both[..., :g.shape[-1]], both[..., g.shape[-1]:]
        return cfg, params, meta
    return halves


@pytest.mark.parametrize("family,keys", [
    ("qwen3_moe", ("head_dim", "num_local_experts", "moe_intermediate_size")),
    ("olmoe", ("num_experts", "intermediate_size", "clip_qkv", "router_aux_loss_coef")),
    ("qwen2_moe", ("qkv_bias", "shared_expert_intermediate_size", "mlp_only_layers", "tie_word_embeddings",
                   "intermediate_size", "moe_intermediate_size")),
    ("glm4_moe", ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "use_qk_norm",
                  "attention_bias", "head_dim", "n_routed_experts", "n_shared_experts", "intermediate_size")),
    ("gpt_oss", ("layer_types", "sliding_window", "swiglu_alpha", "swiglu_limit", "attention_bias", "head_dim",
                 "num_local_experts", "intermediate_size", "router_aux_loss_coef")),
    ("deepseek_v3", ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "rope_interleave", "n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace",
                     "n_routed_experts", "n_shared_experts", "intermediate_size", "moe_intermediate_size"))])
def test_family_exports_the_tensors_it_imported(imported, tmp_path, family, keys):
    from safetensors.numpy import load_file

    r = run_script("export_hf.py", imported[family], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    want = load_file(os.path.join(FIXTURES[family], "model.safetensors"))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    exported = json.load(open(tmp_path / "hf" / "config.json"))
    original = json.load(open(os.path.join(FIXTURES[family], "config.json")))
    for key in ("model_type", "norm_topk_prob", "rms_norm_eps", "num_key_value_heads", "rope_parameters") + keys:
        assert exported.get(key) == original.get(key), key


def test_a_family_config_that_does_not_fit_its_weights_is_one_line():
    from moejax.config.model import config_from_dict, load_config
    from moejax.errors import UserError

    base = {k: v for k, v in dataclasses.asdict(load_config("tiny")).items() if k != "name"}
    with pytest.raises(UserError, match="qk_norm='none' does not fit family qwen3_moe"):
        registry.family_of(config_from_dict({**base, "family": "qwen3_moe"}, "x"))
    with pytest.raises(UserError, match="qk_norm='head' does not fit family mixtral"):
        registry.family_of(config_from_dict({**base, "qk_norm": "head"}, "x"))


@pytest.mark.parametrize("family,change,needle", [
    ("qwen3_moe", lambda c: {**c, "use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("qwen3_moe", lambda c: {**c, "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("qwen3_moe", lambda c: {**c, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0}},
     "rope_type='dynamic' is not supported"),
    ("qwen3_moe", lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": "4k"}},
     "rope original_max_position_embeddings='4k' must be a number"),
    ("qwen3_moe", lambda c: {**c, "mlp_only_layers": "all"}, "mlp_only_layers='all' must be a list"),
    ("qwen2_moe", lambda c: {**c, "use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("qwen2_moe", lambda c: {**c, "shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    ("glm4_moe", lambda c: {**c, "first_k_dense_replace": 4}, "first_k_dense_replace=4 must be in [0, "),
    ("glm4_moe", lambda c: {**c, "n_group": 3}, "n_group=3, topk_group=2 must divide num_experts=8"),
    ("glm4_moe", lambda c: {**c, "topk_group": 1, "num_experts_per_tok": 3}, "experts_per_token=3 exceeds the 2"),
    ("glm4_moe", lambda c: {**c, "model_type": "deepseek_v2"}, "model family 'deepseek_v2' is not implemented"),
    ("deepseek_v3", lambda c: {**c, "num_key_value_heads": 2}, "num_key_value_heads=2 must equal num_attention_heads=4"),
    ("deepseek_v3", lambda c: {**c, "attention_bias": True}, "attention_bias=True is not supported"),
    ("deepseek_v3", lambda c: {**c, "qk_rope_head_dim": 7}, "an even qk_rope_head_dim in (0, head_dim=23)"),
    ("gpt_oss", lambda c: {**c, "layer_types": ["sliding_attention"]}, "layer_types=['sliding_attention'] must list"),
    ("gpt_oss", lambda c: {**c, "sliding_window": None}, "sliding_window=None must be a positive integer"),
])
def test_a_field_moejax_does_not_compute_is_refused_in_one_line(tmp_path, family, change, needle):
    from moejax.checkpoint.hf import config_from_hf
    from moejax.errors import UserError

    hf = tmp_path / "hf"
    hf.mkdir()
    json.dump(change(json.load(open(os.path.join(FIXTURES[family], "config.json")))), open(hf / "config.json", "w"))
    with pytest.raises(UserError) as e:
        config_from_hf(str(hf))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_import_hf_refuses_such_a_field_in_one_line_with_exit_2(tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(FIXTURES["qwen2_moe"], hf)
    json.dump({**json.load(open(hf / "config.json")), "use_sliding_window": True}, open(hf / "config.json", "w"))
    r = run_script("import_hf.py", hf, tmp_path / "out")
    assert r.returncode == 2 and "use_sliding_window=True is not supported" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_transformers_5_fused_expert_tensors_import_as_the_per_expert_ones(imported, tmp_path):
    """transformers 5.x keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F]); a
    checkpoint saved that way imports to the same tensors as the hub's per-expert layout."""
    from safetensors.numpy import load_file, save_file

    src = FIXTURES["glm4_moe"]
    t = load_file(os.path.join(src, "model.safetensors"))
    fused = {k: v for k, v in t.items() if ".experts." not in k}
    for layer in range(1, 4):
        p = f"model.layers.{layer}.mlp.experts."
        fused[p + "gate_up_proj"] = np.stack([np.concatenate([t[f"{p}{e}.gate_proj.weight"], t[f"{p}{e}.up_proj.weight"]])
                                              for e in range(8)])
        fused[p + "down_proj"] = np.stack([t[f"{p}{e}.down_proj.weight"] for e in range(8)])
    hf = tmp_path / "fused"
    hf.mkdir()
    shutil.copy(os.path.join(src, "config.json"), hf / "config.json")
    save_file(fused, str(hf / "model.safetensors"))
    r = run_script("import_hf.py", hf, tmp_path / "ck")
    assert r.returncode == 0, r.stderr
    got = checkpoint.read_meta(str(tmp_path / "ck"))[0]["checksums"]["tensors"]
    assert got == checkpoint.read_meta(imported["glm4_moe"])[0]["checksums"]["tensors"] and "w1" in got


@pytest.mark.parametrize("family,has", [("qwen3_moe", "q_norm"), ("qwen2_moe", "shared_gate"),
                                        ("glm4_moe", "router_bias")])
def test_random_checkpoints_of_a_family_agree_across_formats(imported, tmp_path, family, has):
    """`ckpt make` draws the same tensors as moejax or as HF safetensors (the family's HF names: tied
    head, dense layer, shared expert and correction bias included), from a config file."""
    import yaml

    cfg = checkpoint.config_of(checkpoint.read_meta(imported[family])[0])
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
    yaml.safe_dump({**fields, "rope_scaling": dict(cfg.rope_scaling), "dense_layers": list(cfg.dense_layers)},
                   open(tmp_path / "c.yaml", "w"))
    for fmt in ("moejax", "hf"):
        r = run_script("make_checkpoint.py", "--config", tmp_path / "c.yaml", "--out", tmp_path / fmt, "--format", fmt,
                       "--seed", "5")
        assert r.returncode == 0, r.stderr
    r = run_script("import_hf.py", tmp_path / "hf", tmp_path / "imported")
    assert r.returncode == 0, r.stderr
    a = checkpoint.read_meta(str(tmp_path / "moejax"))[0]["checksums"]["tensors"]
    b = checkpoint.read_meta(str(tmp_path / "imported"))[0]["checksums"]["tensors"]
    assert a == b and has in a


def test_a_quantized_family_checkpoint_keeps_its_norms_and_serves(imported, tmp_path):
    """GLM-4.5's int8 checkpoint: every matrix (shared experts and the dense layer's included) within half
    a step of the float one, norms, biases and the correction bias kept float; it generates (one device:
    int8 on sharded meshes is tests/test_quant.py's)."""
    from moejax.models.params import quant_dims
    from moejax.ops.quant import scale_name

    r = run_script("quantize.py", imported["glm4_moe"], tmp_path / "q")
    assert r.returncode == 0, r.stderr
    m, lay = make_mesh(parse_mesh("1x1x1x1")), load_layout("seed")
    cfg, floats, _ = checkpoint.restore(imported["glm4_moe"], m, lay)
    _, params, meta = checkpoint.restore(str(tmp_path / "q"), m, lay)
    assert meta["quant"] == "int8" and {"shared_w1", "dense_w2", "wq"} <= set(quant_dims(cfg))
    for name in quant_dims(cfg):
        q, s, w = (np.asarray(a, np.float64) for a in (params[name], params[scale_name(name)], floats[name]))
        assert params[name].dtype == np.int8 and np.all(np.abs(q * s - w) <= s / 2 * (1 + 1e-6)), name
    for name in ("q_norm", "bq", "router_bias", "shared_gate" if "shared_gate" in params else "router"):
        assert params[name].dtype == np.float32, name
    r = run_script("infer.py", "--ckpt", tmp_path / "q", "--mesh", "1x1x1x1", "--prompt-ids", "[[1, 2, 3]]",
                   "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"][0]) == 4


def test_a_sigmoid_router_stays_float32_in_a_bfloat16_checkpoint(tmp_path):
    """transformers keeps GLM-4.5's gate.weight and e_score_correction_bias in float32
    (_keep_in_fp32_modules_strict): a bfloat16 import stores them float32, and restore keeps them so."""
    r = run_script("import_hf.py", FIXTURES["glm4_moe"], tmp_path / "ck", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    _, params, meta = checkpoint.restore(str(tmp_path / "ck"), make_mesh(parse_mesh("1x1x1x1")), load_layout("seed"),
                                         "bfloat16")
    assert meta["dtype"] == "bfloat16" and params["wq"].dtype.name == "bfloat16"
    assert params["router"].dtype == np.float32 and params["router_bias"].dtype == np.float32
