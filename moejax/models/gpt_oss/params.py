"""GPT-OSS's parameters (models/family.py `Param`), in its Hugging Face checkpoint's order.

Mixtral's table with: q/k/v biases (models/rows.py) and the output projection's bias bo [L, D]; a sink
logit per head, sinks [L, H] (sharded with the heads); the router at mlp.router with its logit bias
[L, E]; the experts as transformers stores them, every expert of a layer in one tensor and not
transposed: mlp.experts.gate_up_proj [E, D, 2F] holds w1 (gate, even columns) and w3 (up, odd
columns), down_proj [E, F, D] is w2, and their biases gate_up_proj_bias [E, 2F] (b1, b3 interleaved
alike) and down_proj_bias [E, D] (b2). The norms stay float32 whatever the model's dtype and scale
in float32 (ops/layers.py rmsnorm), as transformers computes them (it stores them float32 under
float16, _keep_in_fp32_modules; the hub's bfloat16 values are exact in float32).
The hub's MXFP4 form of the expert tensors (gate_up_proj_blocks / _scales) is dequantised by the
reader (checkpoint/hf_formats.py) one expert at a time (models/hf_map.py expert_reads).
"""

from __future__ import annotations

import dataclasses

from moejax.models import rows
from moejax.models.family import Param
from moejax.models.mixtral.params import PARAMS as MIXTRAL_PARAMS

_L = "model.layers.{l}."
_X = _L + "mlp.experts."
_MOE = lambda c: len(c.moe_layers)  # noqa: E731
_HF = {"router": dict(hf=_L + "mlp.router.weight"),
       "w1": dict(hf=_X + "gate_up_proj", hf_transpose=False, hf_fused="", hf_chunk=(0, 1), hf_interleave=(0, 2)),
       "w3": dict(hf=_X + "gate_up_proj", hf_transpose=False, hf_fused="", hf_chunk=(0, 1), hf_interleave=(1, 2)),
       "w2": dict(hf=_X + "down_proj", hf_transpose=False, hf_fused=""),
       **{n: dict(f32=True) for n in ("final_norm", "attn_norm", "moe_norm")}}
_ATTENTION = (
    Param("bo", lambda c: (c.num_layers, c.d_model), ("layers", None), hf=_L + "self_attn.o_proj.bias", init="zeros",
          when=lambda c: c.attention_out_bias),
    Param("sinks", lambda c: (c.num_layers, c.num_heads), ("layers", "heads"), hf=_L + "self_attn.sinks",
          init="zeros", when=lambda c: c.attention_sinks))
_ROUTER_BIAS = Param("router_logit_bias", lambda c: (_MOE(c), c.num_experts), ("layers", None),
                     hf=_L + "mlp.router.bias", init="zeros", kind="moe", when=lambda c: c.router_logit_bias)
_EXPERT_BIASES = (
    Param("b1", lambda c: (_MOE(c), c.num_experts, c.expert_ffn), ("layers", "experts", "expert_ffn"),
          hf=_X + "gate_up_proj_bias", hf_interleave=(0, 2), init="zeros", kind="moe", when=lambda c: c.expert_bias),
    Param("b3", lambda c: (_MOE(c), c.num_experts, c.expert_ffn), ("layers", "experts", "expert_ffn"),
          hf=_X + "gate_up_proj_bias", hf_interleave=(1, 2), init="zeros", kind="moe", when=lambda c: c.expert_bias),
    Param("b2", lambda c: (_MOE(c), c.num_experts, c.d_model), ("layers", "experts", None),
          hf=_X + "down_proj_bias", init="zeros", kind="moe", when=lambda c: c.expert_bias))


def _table() -> tuple:
    out = []
    for p in MIXTRAL_PARAMS:
        out.append(dataclasses.replace(p, **_HF.get(p.name, {})))
        if p.name == "wv":
            out.extend(rows.attention_biases())
        if p.name == "wo":
            out.extend(_ATTENTION)
        if p.name == "router":
            out.append(_ROUTER_BIAS)
    return tuple(out) + _EXPERT_BIASES


PARAMS = _table()
