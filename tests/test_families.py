"""Model families beside Mixtral, each against transformers' own numbers (tests/data/hf-*-tiny, made by
scripts/hf_family_fixtures.py): logits within 1e-5 relative on several meshes and both layouts, greedy
tokens, the training loss terms, export round trips; each term the family adds is shown to matter."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO, RTOL, rel_err, run_script
from moejax.checkpoint import store as checkpoint
from moejax.inference.generate import Generator, put, round_up
from moejax.inference.sampling import Sampling
from moejax.models import counts, registry
from moejax.models import transformer as model
from moejax.models.runspec import RunSpec
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout
from moejax.training.loss import Scorer

DATA = os.path.join(REPO, "tests", "data")
QWEN3 = os.path.join(DATA, "hf-qwen3-moe-tiny")
FIXTURES = {"qwen3_moe": QWEN3, "olmoe": os.path.join(DATA, "hf-olmoe-tiny")}
FAMILIES = sorted(FIXTURES)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each family's fixture imported as a moejax checkpoint (once per module)."""
    out = {}
    for family, hf in FIXTURES.items():
        out[family] = str(tmp_path_factory.mktemp("ck") / family)
        r = run_script("import_hf.py", hf, out[family])
        assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def qwen3(imported):
    return imported["qwen3_moe"]


def _ref(family):
    return np.load(os.path.join(FIXTURES[family], "reference.npz"))


def _forward(ckpt, mesh_text, layout="seed", change=None):
    shape, lay = parse_mesh(mesh_text), load_layout(layout)
    m = make_mesh(shape)
    cfg, stacked, _ = checkpoint.restore(ckpt, m, lay)
    cfg = change(cfg) if change else cfg
    rs = RunSpec(cfg, lay, shape, "float32")
    params = model.serving_params(stacked, rs, m)
    ids = np.load(os.path.join(QWEN3, "reference.npz"))["input_ids"].astype(np.int32)  # the same in every fixture
    b = round_up(ids.shape[0], rs.batch_multiple)  # rows past the prompts: padding, length 0
    tokens = np.zeros((b, ids.shape[1]), np.int32)
    tokens[:len(ids)] = ids
    lengths = np.where(np.arange(b) < len(ids), ids.shape[1], 0).astype(np.int32)
    logits, _ = model.build(rs, m, "forward")(params, put(m, lay, "tokens", tokens), put(m, lay, "lengths", lengths))
    return rs, m, params, np.asarray(logits)[:len(ids)]


@pytest.mark.parametrize("family,want,params", [
    ("qwen3_moe", ("head", True, 32, 16, 0.001), 181_696),  # head_dim decoupled from d_model / heads
    ("olmoe", ("proj", False, 16, 16, 0.01), 157_184)])
def test_a_checkpoint_imports_as_its_own_family(imported, family, want, params):
    cfg = checkpoint.config_of(checkpoint.read_meta(imported[family])[0])
    assert cfg.family == family
    assert (cfg.qk_norm, cfg.norm_topk_prob, cfg.head_dim, cfg.d_model // cfg.num_heads, cfg.router_aux_loss_coef) == want
    assert counts.param_count(cfg) == params  # what transformers counted


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh,layout", [("1x1x1x1", "seed"), ("1x2x2x2", "seed"), ("2x2x1x2", "seed"),
                                         ("1x1x2x2", "ep-tp")])
def test_family_logits_equal_transformers(imported, family, mesh, layout):
    assert rel_err(_forward(imported[family], mesh, layout)[3], _ref(family)["logits"]) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_tokens_equal_transformers(imported, family):
    ref = _ref(family)
    rs, m, params, _ = _forward(imported[family], "1x2x2x2")
    prompts = ref["input_ids"].astype(np.int32).tolist()
    gen = Generator(rs, m, params, len(prompts), len(prompts[0]), len(prompts[0]) + 12)
    assert gen.generate(prompts, 12, Sampling(), eos_id=None)["generated_ids"] == ref["generated_ids"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loss_terms_equal_transformers(imported, family):
    ref = _ref(family)
    shape, lay = parse_mesh("1x2x2x2"), load_layout("seed")
    m = make_mesh(shape)
    cfg, stacked, _ = checkpoint.restore(imported[family], m, lay)
    got = Scorer(RunSpec(cfg, lay, shape, "float32", training=True), m).evaluate(stacked, ref["input_ids"])
    assert abs(got["ce_loss"] - float(ref["ce_loss"])) <= 1e-5 * float(ref["ce_loss"])
    assert abs(got["aux_loss"] - float(ref["aux_loss"])) <= 1e-5 * float(ref["aux_loss"])


@pytest.mark.parametrize("family,term,change", [
    ("qwen3_moe", "per-head QK-norm", lambda c: dataclasses.replace(c, qk_norm="none")),
    ("qwen3_moe", "norm_topk_prob", lambda c: dataclasses.replace(c, norm_topk_prob=False)),
    ("olmoe", "QK-norm over the projection", lambda c: dataclasses.replace(c, qk_norm="none")),
    ("olmoe", "raw top-k weights", lambda c: dataclasses.replace(c, norm_topk_prob=True)),
    ("olmoe", "clip_qkv", lambda c: dataclasses.replace(c, clip_qkv=0.1)),
])
def test_each_term_a_family_adds_matters(imported, monkeypatch, family, term, change):
    """Without the term (or with it where the family has none) the logits are far from
    transformers': the fixture exercises it."""
    monkeypatch.setitem(registry.FAMILIES, family, dataclasses.replace(registry.FAMILIES[family], fixed=()))
    assert rel_err(_forward(imported[family], "1x2x2x2", change=change)[3], _ref(family)["logits"]) > 1e3 * RTOL, term


@pytest.mark.parametrize("family,keys", [
    ("qwen3_moe", ("head_dim", "num_local_experts", "moe_intermediate_size")),
    ("olmoe", ("num_experts", "intermediate_size", "clip_qkv", "router_aux_loss_coef"))])
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
        assert exported[key] == original[key], key


def test_a_family_config_that_does_not_fit_its_weights_is_one_line():
    from moejax.config.model import config_from_dict, load_config
    from moejax.errors import UserError

    base = {k: v for k, v in dataclasses.asdict(load_config("tiny")).items() if k != "name"}
    with pytest.raises(UserError, match="qk_norm='none' does not fit family qwen3_moe"):
        registry.family_of(config_from_dict({**base, "family": "qwen3_moe"}, "x"))
    with pytest.raises(UserError, match="qk_norm='head' does not fit family mixtral"):
        registry.family_of(config_from_dict({**base, "qk_norm": "head"}, "x"))


@pytest.mark.parametrize("change,needle", [
    (lambda c: {**c, "mlp_only_layers": [1]}, "dense layers"),
    (lambda c: {**c, "use_sliding_window": True}, "use_sliding_window=True is not supported"),
    (lambda c: {**c, "attention_bias": True}, "attention_bias=True is not supported"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
])
def test_a_qwen3_moe_field_moejax_does_not_compute_is_refused_in_one_line(tmp_path, change, needle):
    hf = tmp_path / "hf"
    shutil.copytree(QWEN3, hf)
    c = json.load(open(hf / "config.json"))
    json.dump(change(c), open(hf / "config.json", "w"))
    r = run_script("import_hf.py", hf, tmp_path / "out")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_random_checkpoints_of_a_family_agree_across_formats(tmp_path):
    """`ckpt make` draws the same tensors as moejax or as HF safetensors (the family's HF names)."""
    for fmt in ("moejax", "hf"):
        r = run_script("make_checkpoint.py", "--config", "tiny-qwen3", "--out", tmp_path / fmt, "--format", fmt, "--seed", "5")
        assert r.returncode == 0, r.stderr
    r = run_script("import_hf.py", tmp_path / "hf", tmp_path / "imported")
    assert r.returncode == 0, r.stderr
    a = checkpoint.read_meta(str(tmp_path / "moejax"))[0]["checksums"]["tensors"]
    b = checkpoint.read_meta(str(tmp_path / "imported"))[0]["checksums"]["tensors"]
    assert a == b and "q_norm" in a


def test_a_quantized_family_checkpoint_keeps_its_norms_and_serves(tmp_path):
    r = run_script("make_checkpoint.py", "--config", "tiny-qwen3", "--out", tmp_path / "f", "--seed", "5")
    assert r.returncode == 0, r.stderr
    r = run_script("quantize.py", tmp_path / "f", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    _, params, meta = checkpoint.restore(str(tmp_path / "q"), make_mesh(parse_mesh("1x1x1x1")), load_layout("seed"))
    assert meta["quant"] == "int8" and params["wq"].dtype == np.int8 and params["q_norm"].dtype == np.float32
    r = run_script("infer.py", "--ckpt", tmp_path / "q", "--mesh", "1x2x2x2", "--prompt-ids", "[[1, 2, 3]]",
                   "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"][0]) == 4
