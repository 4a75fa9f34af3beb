"""OLMoE's parameters (models/family.py `Param`), in its Hugging Face checkpoint's order.

Against Qwen3-MoE's table: q_norm [L, H*K] and k_norm [L, G*K] normalise the whole projection (every
head together), so they are split over the heads like wq and wk; head_dim is d_model / heads.
"""

from __future__ import annotations

from moejax.models.family import Param
from moejax.models.qwen3_moe.params import PARAMS as QWEN3_PARAMS

_L = "model.layers.{l}."
_NORMS = {
    "q_norm": Param("q_norm", lambda c: (c.num_layers, c.num_heads * c.head_dim), ("layers", "heads"),
                    hf=_L + "self_attn.q_norm.weight", init="ones", when=lambda c: c.qk_norm == "proj"),
    "k_norm": Param("k_norm", lambda c: (c.num_layers, c.num_kv_heads * c.head_dim), ("layers", "kv_heads"),
                    hf=_L + "self_attn.k_norm.weight", init="ones", when=lambda c: c.qk_norm == "proj"),
}
PARAMS = tuple(_NORMS.get(p.name, p) for p in QWEN3_PARAMS)
