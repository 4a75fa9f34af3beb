"""The JAX model in float32 on one device equals the independent float64 NumPy reference."""

import numpy as np
import pytest

import reference
from helpers import RTOL, forward, host_params, rel_err
from moejax import model
from moejax.config import load_config
from moejax.module import Mixtral


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
    m = Mixtral(cfg, seed=0)
    assert m.w1[...].shape == (cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.expert_ffn)
    assert m.w1.logical_axes == ("layers", "experts", None, "expert_ffn")
    want = reference.forward(host_params("tiny"), cfg, tokens)
    assert rel_err(m(tokens), want) <= RTOL


def test_random_init_is_the_same_on_any_mesh():
    rs, mesh, params = __import__("helpers").setup("tiny", "4x2x4x4")
    cfg = load_config("tiny")
    direct = model.init_params(cfg, 0, "float32", mesh, rs.layout)
    np.testing.assert_array_equal(np.asarray(direct["w1"]), host_params("tiny")["w1"])
    assert direct["w1"].sharding.spec == rs.layout.param_specs()["w1"]


@pytest.mark.parametrize("mesh", ["1x1x1x1", "1x1x2x2"])  # on one GPU, 1x1x1x1 runs cuDNN's fused attention
def test_bfloat16_run_stays_close_to_the_reference(mesh, tokens):
    cfg = load_config("tiny")
    want = reference.forward(host_params("tiny"), cfg, tokens)
    got, _ = forward("tiny", mesh, tokens, dtype="bfloat16")
    assert rel_err(got, want) < 0.05  # bfloat16 has 8 bits of mantissa; float32 accumulation keeps it near
