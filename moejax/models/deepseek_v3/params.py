"""DeepSeek-V3's parameters (models/family.py `Param`): GLM-4.5's table (the sigmoid router with its
float32 weight and correction bias, the routed experts, the ungated shared experts, the first layers'
dense FFN) with multi-head latent attention in place of q/k/v/o (ops/mla.py):
  q_a_proj [Q, D] -> wq_a [L, D, Q]      q_a_layernorm [Q] -> q_a_norm      q_b_proj [H*K, Q] -> wq_b [L, Q, H, K]
  (or q_proj [H*K, D] -> wq [L, D, H, K] when q_lora_rank is 0)
  kv_a_proj_with_mqa [C+R, D] -> wkv_a [L, D, C+R]    kv_a_layernorm [C] -> kv_a_norm
  kv_b_proj [H*(nope+V), C] -> wkv_b [L, C, H, nope+V]    o_proj [D, H*V] -> wo [L, H, V, D]
K = head_dim = nope + R. The low-rank projections and their norms are replicated (every tp rank needs the
whole latent); the per-head ones split over tp. wkv_b stays in float under int8: decode slices it into the
two halves the absorbed form multiplies by (1.2% of a DeepSeek-V3 layer's weights)."""

from __future__ import annotations

from moejax.models.family import Param
from moejax.models.glm4_moe.params import PARAMS as GLM4_PARAMS

_A = "model.layers.{l}.self_attn."
_Q_LORA = lambda c: c.q_lora_rank > 0  # noqa: E731
_GQA = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm")  # GLM's attention rows, replaced
_MLA = (
    Param("wq_a", lambda c: (c.num_layers, c.d_model, c.q_lora_rank), ("layers", None, None), quant_dims=(1,),
          hf=_A + "q_a_proj.weight", hf_transpose=True, when=_Q_LORA),
    Param("q_a_norm", lambda c: (c.num_layers, c.q_lora_rank), ("layers", None), hf=_A + "q_a_layernorm.weight",
          init="ones", when=_Q_LORA),
    Param("wq_b", lambda c: (c.num_layers, c.q_lora_rank, c.num_heads, c.head_dim), ("layers", None, "heads", None),
          quant_dims=(1,), hf=_A + "q_b_proj.weight", hf_transpose=True, when=_Q_LORA),
    Param("wq", lambda c: (c.num_layers, c.d_model, c.num_heads, c.head_dim), ("layers", None, "heads", None),
          quant_dims=(1,), hf=_A + "q_proj.weight", hf_transpose=True, when=lambda c: not c.q_lora_rank),
    Param("wkv_a", lambda c: (c.num_layers, c.d_model, c.kv_lora_rank + c.qk_rope_head_dim), ("layers", None, None),
          quant_dims=(1,), hf=_A + "kv_a_proj_with_mqa.weight", hf_transpose=True),
    Param("kv_a_norm", lambda c: (c.num_layers, c.kv_lora_rank), ("layers", None), hf=_A + "kv_a_layernorm.weight",
          init="ones"),
    Param("wkv_b", lambda c: (c.num_layers, c.kv_lora_rank, c.num_heads, c.head_dim - c.qk_rope_head_dim + c.v_head_dim),
          ("layers", None, "heads", None), hf=_A + "kv_b_proj.weight", hf_transpose=True),
    Param("wo", lambda c: (c.num_layers, c.num_heads, c.v_head_dim, c.d_model), ("layers", "heads", None, None),
          quant_dims=(1, 2), hf=_A + "o_proj.weight", hf_transpose=True, in_rank=2),
)


def _table() -> tuple:
    out = []
    for p in GLM4_PARAMS:
        if p.name == "wq":
            out.extend(_MLA)
        if p.name not in _GQA:
            out.append(p)
    return tuple(out)


PARAMS = _table()
