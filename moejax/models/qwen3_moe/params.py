"""Qwen3-MoE's parameters (models/family.py `Param`), in its Hugging Face checkpoint's order.

Mixtral's table (the same shapes and axes, K the decoupled head_dim) with per-head q_norm and k_norm
[L, K] after wo, the router at mlp.gate and the experts' gate/up/down at
mlp.experts.{e}.gate_proj/up_proj/down_proj; q/k/v biases under `attention_bias` and the dense
layers' mlp.gate_proj/up_proj/down_proj (`mlp_only_layers`, `decoder_sparse_step`) from models/rows.py.
"""

from __future__ import annotations

import dataclasses

from moejax.models import rows
from moejax.models.family import Param
from moejax.models.mixtral.params import PARAMS as MIXTRAL_PARAMS

_L = "model.layers.{l}."
_X = _L + "mlp.experts.{e}."
_HF = {"router": _L + "mlp.gate.weight", "w1": _X + "gate_proj.weight", "w3": _X + "up_proj.weight",
       "w2": _X + "down_proj.weight"}
# one RMSNorm weight per head dimension, shared by the heads: replicated
_HEAD_NORM = lambda c: c.qk_norm == "head"  # noqa: E731
_QK_NORMS = (Param("q_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), hf=_L + "self_attn.q_norm.weight",
                   init="ones", when=_HEAD_NORM),
             Param("k_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), hf=_L + "self_attn.k_norm.weight",
                   init="ones", when=_HEAD_NORM))


def _table() -> tuple:
    out = []
    for p in MIXTRAL_PARAMS:
        out.append(dataclasses.replace(p, hf=_HF.get(p.name, p.hf)))
        if p.name == "wv":
            out.extend(rows.attention_biases())
        if p.name == "wo":
            out.extend(_QK_NORMS)
    return tuple(out) + rows.dense_layer_ffn()


PARAMS = _table()
