"""Mixtral's parameters: one row per stacked tensor (moejax/models/family.py `Param`), in the order
of its Hugging Face checkpoint (global tensors, then per layer: its own, then each expert's).

HF stores torch `Linear` weights as [out, in]; moejax stores [in, ...] with heads split:
  q_proj [H*K, D] -> wq[l] [D, H, K]    o_proj [D, H*K] -> wo[l] [H, K, D]
  gate [E, D] -> router[l] [D, E]       experts.{e}.w1/w3 [F, D] -> w1/w3[l, e] [D, F]
  experts.{e}.w2 [D, F] -> w2[l, e] [F, D]    lm_head [V, D] -> lm_head [D, V]
The router and experts stack the MoE layers (`kind="moe"`: every layer of a Mixtral); lm_head is
absent when the head is tied to the embedding.
"""

from __future__ import annotations

from moejax.models.family import Param

_L = "model.layers.{l}."
_X = _L + "block_sparse_moe.experts.{e}."
_FUSED = _L + "mlp.experts."  # transformers 5.x's in-memory names: gate_up_proj [E, 2F, D], down_proj [E, D, F]

PARAMS = (
    Param("embed", lambda c: (c.vocab_size, c.d_model), ("vocab", None), hf="model.embed_tokens.weight"),
    Param("final_norm", lambda c: (c.d_model,), (None,), hf="model.norm.weight", init="ones"),
    Param("lm_head", lambda c: (c.d_model, c.vocab_size), (None, "vocab"), hf="lm_head.weight", hf_transpose=True,
          when=lambda c: not c.tie_word_embeddings),
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
    # every device routes its own tokens: the router is replicated
    Param("router", lambda c: (len(c.moe_layers), c.d_model, c.num_experts), ("layers", None, None),
          hf=_L + "block_sparse_moe.gate.weight", hf_transpose=True, kind="moe"),
    Param("w1", lambda c: (len(c.moe_layers), c.num_experts, c.d_model, c.expert_ffn),  # gate
          ("layers", "experts", None, "expert_ffn"), quant_dims=(2,), hf=_X + "w1.weight", hf_transpose=True,
          kind="moe", hf_fused=_FUSED + "gate_up_proj", hf_chunk=(0, 2)),
    Param("w3", lambda c: (len(c.moe_layers), c.num_experts, c.d_model, c.expert_ffn),  # up
          ("layers", "experts", None, "expert_ffn"), quant_dims=(2,), hf=_X + "w3.weight", hf_transpose=True,
          kind="moe", hf_fused=_FUSED + "gate_up_proj", hf_chunk=(1, 2)),
    Param("w2", lambda c: (len(c.moe_layers), c.num_experts, c.expert_ffn, c.d_model),  # down
          ("layers", "experts", "expert_ffn", None), quant_dims=(2,), hf=_X + "w2.weight", hf_transpose=True,
          kind="moe", hf_fused=_FUSED + "down_proj"),
)
