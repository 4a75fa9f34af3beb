"""Qwen3-MoE's parameters (models/family.py `Param`), in its Hugging Face checkpoint's order.

Against Mixtral's table: per-head q_norm and k_norm [L, K] (K the decoupled head_dim), the router
at mlp.gate and the experts' gate/up/down at mlp.experts.{e}.gate_proj/up_proj/down_proj.
"""

from __future__ import annotations

from moejax.models.family import Param

_L = "model.layers.{l}."
_X = _L + "mlp.experts.{e}."

PARAMS = (
    Param("embed", lambda c: (c.vocab_size, c.d_model), ("vocab", None), hf="model.embed_tokens.weight"),
    Param("final_norm", lambda c: (c.d_model,), (None,), hf="model.norm.weight", init="ones"),
    Param("lm_head", lambda c: (c.d_model, c.vocab_size), (None, "vocab"), hf="lm_head.weight", hf_transpose=True),
    Param("attn_norm", lambda c: (c.num_layers, c.d_model), ("layers", None),
          hf=_L + "input_layernorm.weight", init="ones"),
    Param("moe_norm", lambda c: (c.num_layers, c.d_model), ("layers", None),
          hf=_L + "post_attention_layernorm.weight", init="ones"),
    Param("wq", lambda c: (c.num_layers, c.d_model, c.num_heads, c.head_dim), ("layers", None, "heads", None),
          quant_dims=(1,), hf=_L + "self_attn.q_proj.weight", hf_transpose=True),
    Param("wk", lambda c: (c.num_layers, c.d_model, c.num_kv_heads, c.head_dim), ("layers", None, "kv_heads", None),
          quant_dims=(1,), hf=_L + "self_attn.k_proj.weight", hf_transpose=True),
    Param("wv", lambda c: (c.num_layers, c.d_model, c.num_kv_heads, c.head_dim), ("layers", None, "kv_heads", None),
          quant_dims=(1,), hf=_L + "self_attn.v_proj.weight", hf_transpose=True),
    Param("wo", lambda c: (c.num_layers, c.num_heads, c.head_dim, c.d_model), ("layers", "heads", None, None),
          quant_dims=(1, 2), hf=_L + "self_attn.o_proj.weight", hf_transpose=True, in_rank=2),
    # one RMSNorm weight per head dimension, shared by the heads: replicated
    Param("q_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), hf=_L + "self_attn.q_norm.weight",
          init="ones"),
    Param("k_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), hf=_L + "self_attn.k_norm.weight",
          init="ones"),
    Param("router", lambda c: (c.num_layers, c.d_model, c.num_experts), ("layers", None, None),
          hf=_L + "mlp.gate.weight", hf_transpose=True),
    Param("w1", lambda c: (c.num_layers, c.num_experts, c.d_model, c.expert_ffn),  # gate_proj
          ("layers", "experts", None, "expert_ffn"), quant_dims=(2,), hf=_X + "gate_proj.weight", hf_transpose=True),
    Param("w3", lambda c: (c.num_layers, c.num_experts, c.d_model, c.expert_ffn),  # up_proj
          ("layers", "experts", None, "expert_ffn"), quant_dims=(2,), hf=_X + "up_proj.weight", hf_transpose=True),
    Param("w2", lambda c: (c.num_layers, c.num_experts, c.expert_ffn, c.d_model),  # down_proj
          ("layers", "experts", "expert_ffn", None), quant_dims=(2,), hf=_X + "down_proj.weight", hf_transpose=True),
)
