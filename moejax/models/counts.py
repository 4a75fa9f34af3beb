"""Analytic sizes of a config: parameter counts and forward FLOPs, from its family's table."""

from __future__ import annotations

import math

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.models.registry import family_of


def layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one layer, per layer tensor."""
    return {p.name: math.prod(p.shape(cfg)[1:]) for p in family_of(cfg).params if p.per_layer}


def param_count(cfg: ModelConfig) -> int:
    """Total parameters: layers, embedding, head and final norm."""
    return sum(math.prod(p.shape(cfg)) for p in family_of(cfg).params)


def active_matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights a token multiplies by: each layer's matrices (its k of E experts'), and the head."""
    total = 0
    for p in family_of(cfg).params:
        if p.init == "ones" or p.name == "embed":  # norms scale, the embedding is a lookup
            continue
        n = math.prod(p.shape(cfg))
        total += n * cfg.experts_per_token // cfg.num_experts if p.per_expert else n
    return total


def flops_per_token_prefill(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs per prompt token (2 per multiply-add), causal attention averaged over
    positions, full-vocabulary head on every token."""
    attn = 4 * cfg.num_heads * cfg.head_dim * (prompt_len + 1) / 2  # QK^T and PV
    return 2 * active_matmul_params_per_token(cfg) + cfg.num_layers * attn


def flops_per_token_decode(cfg: ModelConfig, context_len: int) -> float:
    """FLOPs of one decode step per sequence attending to `context_len` cached positions."""
    attn = 4 * cfg.num_heads * cfg.head_dim * context_len
    return 2 * active_matmul_params_per_token(cfg) + cfg.num_layers * attn


def param_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
    return param_count(cfg) * dtype_bytes(dtype or cfg.param_dtype)
