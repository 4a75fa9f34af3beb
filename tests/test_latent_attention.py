"""DeepSeek-V3's multi-head latent attention beyond the family tests (tests/test_families.py checks its
logits, tokens, losses and gradients against transformers): the absorbed decode against the expanded
form and the no-cache forward at every step of a generation longer than its prompt, the latent cache's
size, and the import's line about the multi-token-prediction layer."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO, RTOL, import_fixture, rel_err, run_script
from moejax.checkpoint import store as checkpoint
from moejax.inference.generate import put
from moejax.models import cache as kv_cache
from moejax.models import transformer as model
from moejax.models.placement import placement
from moejax.models.runspec import RunSpec
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

HF = os.path.join(REPO, "tests", "data", "hf-deepseek-v3-tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return import_fixture(tmp_path_factory, HF, "ds")


def _steps(ckpt, mesh_text: str, absorb: bool, prompt: np.ndarray, new: int, layout: str = "seed"):
    """Greedy decode of `new` tokens after a prefill of `prompt` [B, T] with the cache: each step's
    logits [new, B, V] and the tokens."""
    shape, lay = parse_mesh(mesh_text), load_layout(layout)
    m = make_mesh(shape)
    cfg, stacked, _ = checkpoint.restore(ckpt, m, lay)
    rs = RunSpec(cfg, lay, shape, "float32", mla_absorb=absorb)
    params = model.serving_params(stacked, rs, m)
    b, t = prompt.shape
    cache = kv_cache.init_cache(rs, m, b, t + new)
    logits, cache, _ = model.build(rs, m, "prefill")(params, put(m, lay, "tokens", prompt),
                                                     put(m, lay, "lengths", np.full(b, t, np.int32)), cache)
    decode = model.build(rs, m, "decode")
    out, tokens = [], [prompt]
    for i in range(new):
        tok = np.asarray(logits).argmax(-1).astype(np.int32)[:, None]
        tokens.append(tok)
        logits, cache, _ = decode(params, put(m, lay, "tokens", tok), put(m, lay, "lengths",
                                                                          np.full(b, t + i, np.int32)), cache)
        out.append(np.asarray(logits))
    return np.stack(out), np.concatenate(tokens, axis=1), (rs, m, params)


def test_absorbed_decode_equals_expanded_and_the_forward_at_every_step(ckpt, mesh="1x2x2x2", layout="seed"):
    """A 6-token prompt and 14 decode steps (past the prompt's length, past yarn's original 16), on a mesh
    splitting the heads over tp and the layers over pp: each step's logits in the absorbed form equal the
    expanded form's and the no-cache forward's of the sequence so far, within the logits bound; the
    greedy tokens are the same (the ep-tp layout's latent attention: tests/test_families.py's logits)."""
    prompt = np.load(os.path.join(HF, "reference.npz"))["input_ids"][:, :6].astype(np.int32)
    b = len(prompt) * 2  # 4 rows: every batch shard of both meshes holds a row
    prompt = np.concatenate([prompt, prompt[:, ::-1]])[:b]
    absorbed, toks_a, (rs, m, params) = _steps(ckpt, mesh, True, prompt, 14, layout)
    expanded, toks_e, _ = _steps(ckpt, mesh, False, prompt, 14, layout)
    assert np.array_equal(toks_a, toks_e)
    assert rel_err(absorbed, expanded) <= RTOL
    fwd = model.build(rs, m, "forward")
    lay = rs.layout
    # step i fed new token i at position 6 + i: the forward of all 20 tokens has its logits there
    full, _ = fwd(params, put(m, lay, "tokens", toks_a), put(m, lay, "lengths", np.full(b, toks_a.shape[1], np.int32)))
    want = np.asarray(full)[:, prompt.shape[1]:].transpose(1, 0, 2)  # [steps, B, V]
    assert rel_err(absorbed, want) <= RTOL


def test_the_latent_cache_holds_what_the_config_says(ckpt):
    """kv_lora_rank + qk_rope_head_dim values per token per layer (16 + 8 here, not 2 x 4 heads x 24),
    replicated over tp: the allocated buffers and the placement report agree, and DeepSeek-V3's preset
    keeps 576 values where its expanded keys and values would be 128 x (192 + 128) = 40,960."""
    from moejax.config.model import load_config

    shape, lay = parse_mesh("1x2x2x2"), load_layout("seed")
    m = make_mesh(shape)
    cfg = checkpoint.config_of(checkpoint.read_meta(ckpt)[0])
    rs = RunSpec(cfg, lay, shape, "bfloat16")
    cache = kv_cache.init_cache(rs, m, 4, 40)
    assert kv_cache.cache_values_per_token(cfg) == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 24
    leaves = [a for buf in cache for a in buf]
    assert len(leaves) == cfg.num_layers // shape.pp  # one buffer per local layer, one kind of buffer
    assert sum(a.nbytes for a in leaves) == cfg.num_layers * 4 * 40 * 24 * 2
    per_device = leaves[0].addressable_shards[0].data.shape  # [1 stage, B / batch shards, S, 1, C + R]
    assert per_device == (1, 4 // 2, 40, 1, 24)  # replicated over tp (2), split over ep (2) and pp
    report = placement(cfg, lay, shape, "bfloat16", 4, 40)
    assert report["placement"]["kv_bytes_per_device"] == np.prod(per_device) * 2 * (cfg.num_layers // shape.pp)
    v3 = load_config("deepseek-v3")
    assert kv_cache.cache_values_per_token(v3) == 576
    assert v3.num_heads * (v3.head_dim + v3.v_head_dim) == 40_960


def test_import_says_it_ignored_the_multi_token_prediction_layer(tmp_path):
    """A checkpoint with a layer past num_hidden_layers (DeepSeek-V3's MTP layer 61; here 4) imports
    without it, and says so in one line and in --json."""
    from safetensors.numpy import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(HF, hf)
    tensors = load_file(str(hf / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("model.layers.3.")]:
        tensors[name.replace("model.layers.3.", "model.layers.4.")] = tensors[name]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    r = run_script("import_hf.py", hf, tmp_path / "ck", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    n = sum(name.startswith("model.layers.4.") for name in tensors)
    assert f"ignored {n} tensors of model.layers.4 (past num_hidden_layers" in lines[-2]
    assert json.loads(lines[-1])["ignored_layers"] == {"4": n}


def test_an_int8_checkpoint_keeps_the_latent_path_float_and_stays_close(ckpt, tmp_path):
    """`ckpt quantize`: the projections (wq_a, wq_b, wkv_a, wo) int8 within half a step, the latent norms and
    kv_b (which the absorbed decode slices) float; on 1x2x2x2 (heads and their scales over tp) the
    weight-only int8 forward equals the float forward on the dequantized weights, and a generation
    with the cache runs."""
    from moejax.models.params import quant_dims
    from moejax.ops.quant import dequantize, scale_name

    r = run_script("quantize.py", ckpt, tmp_path / "q")
    assert r.returncode == 0, r.stderr
    shape, lay = parse_mesh("1x2x2x2"), load_layout("seed")
    m = make_mesh(shape)
    cfg, floats, _ = checkpoint.restore(ckpt, m, lay)
    _, params, meta = checkpoint.restore(str(tmp_path / "q"), m, lay)
    assert meta["quant"] == "int8" and {"wq_a", "wq_b", "wkv_a", "wo"} <= set(quant_dims(cfg))
    for name in ("wq_a", "wq_b", "wkv_a", "wo"):
        q, s, w = (np.asarray(a, np.float64) for a in (params[name], params[scale_name(name)], floats[name]))
        assert params[name].dtype == np.int8 and np.all(np.abs(q * s - w) <= s / 2 * (1 + 1e-6)), name
    for name in ("wkv_b", "q_a_norm", "kv_a_norm", "router_bias"):
        assert params[name].dtype == np.float32, name
    ids = np.load(os.path.join(HF, "reference.npz"))["input_ids"].astype(np.int32)
    tokens, lengths = np.concatenate([ids, ids]), np.full(4, ids.shape[1], np.int32)
    out = []
    for quant, p in (("int8", params), (None, dequantize(params))):
        rs = RunSpec(cfg, lay, shape, "float32", quant=quant, quant_matmul="dequant")
        fwd = model.build(rs, m, "forward")
        out.append(np.asarray(fwd(model.serving_params(dict(p), rs, m), put(m, lay, "tokens", tokens),
                                  put(m, lay, "lengths", lengths))[0]))
    assert rel_err(out[0], out[1]) <= RTOL  # weight-only int8: the float model on the weights q * s
    r = run_script("infer.py", "--ckpt", tmp_path / "q", "--mesh", "1x2x2x2", "--prompt-ids", "[[1, 2, 3]]",
                   "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"][0]) == 4
