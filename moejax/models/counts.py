"""Analytic sizes of a config: parameter counts and forward FLOPs, from its family's table."""

from __future__ import annotations

import math

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.models.params import table


def layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one layer of the tensor's kind (a MoE layer's, a dense layer's, any layer's), per layer tensor."""
    return {p.name: math.prod(p.shape(cfg)[1:]) for p in table(cfg) if p.per_layer}


def param_count(cfg: ModelConfig) -> int:
    """Total parameters: layers, embedding, head and final norm."""
    return sum(math.prod(p.shape(cfg)) for p in table(cfg))


def active_matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights a token multiplies by: each layer's matrices (its k of E experts', the shared expert, a dense
    layer's FFN), and the head (the embedding's transpose when tied)."""
    total = cfg.vocab_size * cfg.d_model if cfg.tie_word_embeddings else 0
    for p in table(cfg):
        if p.init in ("ones", "zeros") or p.hf == "model.embed_tokens.weight":  # norms and biases add, the
            continue  # embedding is a lookup
        n = math.prod(p.shape(cfg))
        total += n * cfg.experts_per_token // cfg.num_experts if p.per_expert else n
    return total


def attention_flops_per_position(cfg: ModelConfig, decode: bool) -> float:
    """FLOPs of one query head against one key position: its score and its share of the weighted sum.
    Latent attention prefills expanded (q.k over head_dim, p.v over v_head_dim) and decodes absorbed
    (over the latent and the RoPE key, then the latent: ops/mla.py)."""
    if not cfg.latent_attention:
        return 4 * cfg.head_dim
    if decode:
        return 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.kv_lora_rank
    return 2 * (cfg.head_dim + cfg.v_head_dim)


def attended_positions(cfg: ModelConfig, length: float, prefill: bool) -> float:
    """Key positions a query attends to, averaged over the layers: `length` cached positions at decode,
    or over a prompt of `length` (position i sees i + 1); a sliding layer sees at most its window."""
    def one(window):
        w = window or length
        if not prefill:
            return min(length, w)
        n = int(length)  # sum over i < n of min(i + 1, w), per query
        return (min(n, w) * (min(n, w) + 1) / 2 + max(n - w, 0) * w) / max(n, 1)
    return sum(one(cfg.layer_window(i)) for i in range(cfg.num_layers)) / cfg.num_layers


def flops_per_token_prefill(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs per prompt token (2 per multiply-add), causal attention averaged over
    positions, full-vocabulary head on every token."""
    attn = cfg.num_heads * attention_flops_per_position(cfg, False) * attended_positions(cfg, prompt_len, True)
    return 2 * active_matmul_params_per_token(cfg) + cfg.num_layers * attn


def flops_per_token_decode(cfg: ModelConfig, context_len: int) -> float:
    """FLOPs of one decode step per sequence attending to `context_len` cached positions."""
    attn = cfg.num_heads * attention_flops_per_position(cfg, True) * attended_positions(cfg, context_len, False)
    return 2 * active_matmul_params_per_token(cfg) + cfg.num_layers * attn


def param_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
    return param_count(cfg) * dtype_bytes(dtype or cfg.param_dtype)
