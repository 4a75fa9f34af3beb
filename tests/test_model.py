"""The JAX model in float32 on one device equals the independent float64 NumPy reference."""

import ml_dtypes
import numpy as np
import pytest

import reference
from helpers import RTOL, forward, host_params, rel_err, rel_err_per_row
from moejax.models import transformer as model
from moejax.models.params import param_specs
from moejax.config.model import load_config
from moejax.models.module import MoeModel


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, 256, size=(4, 11)).astype(np.int32)


@pytest.mark.parametrize("config", ["tiny", "tiny-mha"])  # tiny has grouped-query attention (8 heads, 4 kv)
def test_one_device_float32_matches_float64_reference(config, tokens):
    cfg = load_config(config)
    want = reference.forward(host_params(config), cfg, tokens)
    got, stats = forward(config, "1x1x1x1", tokens)
    assert rel_err(got, want) <= RTOL
    assert stats["load"].sum() == cfg.num_layers * tokens.size * cfg.experts_per_token
    assert stats["dropped"].sum() == 0


def test_nnx_module_holds_stacked_parameters_with_logical_axes(tokens):
    cfg = load_config("tiny")
    m = MoeModel(cfg, seed=0)
    assert m.w1[...].shape == (cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.expert_ffn)
    assert m.w1.logical_axes == ("layers", "experts", None, "expert_ffn")
    want = reference.forward(host_params("tiny"), cfg, tokens)
    assert rel_err(m(tokens), want) <= RTOL


def test_random_init_is_the_same_on_any_mesh():
    rs, mesh, params = __import__("helpers").setup("tiny", "4x2x4x4")
    cfg = load_config("tiny")
    direct = model.init_params(cfg, 0, "float32", mesh, rs.layout)
    np.testing.assert_array_equal(np.asarray(direct["w1"]), host_params("tiny")["w1"])
    assert direct["w1"].sharding.spec == param_specs(rs.layout, rs.cfg)["w1"]


@pytest.mark.parametrize("mesh", ["1x1x1x1", "1x1x2x2"])  # on one GPU, 1x1x1x1 runs cuDNN's fused attention
def test_bfloat16_run_stays_within_bfloat16_rounding_of_the_reference(mesh, tokens):
    """Like with like: the reference runs on the same bfloat16-rounded weights, so what remains is
    the rounding of activations to bfloat16 (unit roundoff u = 2**-8). The residual stream is rounded
    twice per layer (after attention, after the MoE block) and the final norm's output once more;
    independent roundings add like a random walk, so each position's logits stay within
    (sqrt(2 L) + 1) u of its largest logit: 0.0150 for 4 layers. Measured: 0.0096 (both meshes, CPU).
    A wrong RoPE theta (1e6 for 1e4) gives 0.059 here; against the float32 weights, as before, it
    gave 0.039, under the old bound of 0.05, and the weights' rounding alone 0.021."""
    cfg = load_config("tiny")
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float64) for k, v in host_params("tiny").items()}
    want = reference.forward(rounded, cfg, tokens)
    got, _ = forward("tiny", mesh, tokens, dtype="bfloat16")
    assert rel_err_per_row(got, want) <= (np.sqrt(2 * cfg.num_layers) + 1) * 2.0 ** -8


@pytest.mark.parametrize("config,mesh,layer_types,want", [
    ("tiny", "1x1x1x1", None, [0, 0, 0, 0]),  # one kind: traced once, called 4 times
    ("tiny", "1x1x1x1", ["sliding_attention", "full_attention"] * 2, [0, 1, 0, 1]),
    ("tiny-glm", "1x2x1x1", None, [0, 1]),  # layer 0 dense: slot 0 dense on stage 0, MoE on stage 1
])
def test_layers_of_one_kind_are_traced_once_per_program(config, mesh, layer_types, want):
    """slot_kinds: the first slot of each kind (windows and MoE-or-dense on every stage); the lowered
    decode program defines one `decoder_layer` per kind and calls it once per local layer."""
    import dataclasses
    import re

    from moejax.inference.generate import put
    from moejax.models import cache as kv_cache
    from moejax.models.runspec import RunSpec
    from moejax.parallel.mesh import make_mesh, parse_mesh, provision_host_devices
    from moejax.parallel.rules import load_layout

    cfg = load_config(config)
    if layer_types:
        cfg = dataclasses.replace(cfg, layer_types=tuple(layer_types), sliding_window=4)
    shape = parse_mesh(mesh)
    provision_host_devices(shape.size)
    m, lay = make_mesh(shape), load_layout("seed")
    rs = RunSpec(cfg, lay, shape, "float32")
    assert model.slot_kinds(rs) == want
    params = model.serving_params(model.init_params(cfg, 0, "float32", m, lay), rs, m)
    cache = kv_cache.init_cache(rs, m, 2, 16)
    text = model.build(rs, m, "decode").lower(params, put(m, lay, "tokens", np.zeros((2, 1), np.int32)),
                                               put(m, lay, "lengths", np.zeros(2, np.int32)), cache).as_text()
    defined = re.findall(r"func\.func private @(decoder_layer\w*)", text)
    assert len(defined) == len(set(want))
    assert sum(len(re.findall(rf"call @{name}\(", text)) for name in defined) == len(want)
