"""Configs: exact parameter counts, analytic FLOPs, validation with actionable one-line errors."""

import pytest

from moejax.config.model import config_from_dict, load_config, load_yaml, resolve_config_path
from moejax.errors import UserError
from moejax.models import counts


def test_seed_config_has_the_stated_dimensions_and_0_45b_parameters():
    cfg = load_config("configs/seed.yaml")
    assert (cfg.num_layers, cfg.num_experts, cfg.experts_per_token, cfg.d_model) == (16, 16, 2, 512)
    assert (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads, cfg.expert_ffn) == (16, 32, 16, 1024)
    assert cfg.vocab_size == 32000 and cfg.param_dtype == "float16"
    assert counts.param_count(cfg) == 452_346_368
    assert counts.param_bytes(cfg) == 904_692_736


def test_seed_10b_config_reaches_the_claimed_size():
    cfg = load_config("seed-10b")
    assert counts.param_count(cfg) == 10_063_775_744
    assert abs(counts.param_bytes(cfg) / 1e9 - 20.1) < 0.05


def test_flops_per_token_counts_active_experts_only():
    cfg = load_config("seed")
    dense_expert = 3 * cfg.d_model * cfg.expert_ffn
    attn = 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
    want = cfg.num_layers * (attn + cfg.d_model * cfg.num_experts + 2 * dense_expert) + cfg.vocab_size * cfg.d_model
    assert counts.active_matmul_params_per_token(cfg) == want
    assert counts.flops_per_token_decode(cfg, 0) == 2 * want
    assert counts.flops_per_token_prefill(cfg, 127) == 2 * want + cfg.num_layers * 4 * 512 * 64


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 6}, "num_heads=6 must be a multiple of num_kv_heads=4"),
    ({"experts_per_token": 17}, "experts_per_token=17 must be <= num_experts=16"),
    ({"d_model": 0}, "d_model=0 must be a positive integer"),
    ({"param_dtype": "int8"}, "param_dtype='int8'; valid: float32, bfloat16, float16"),
    ({"num_experts_typo": 3}, "unknown key 'num_experts_typo'"),
])
def test_bad_config_values_are_named(change, message):
    d = load_yaml(resolve_config_path("tiny"))
    d.update(change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(d, "tiny")


def test_unknown_config_lists_the_shipped_ones():
    with pytest.raises(UserError, match="unknown config 'nope'.*seed, seed-10b"):
        load_config("nope")
