"""GLM-4.5's parameters (models/family.py `Param`): Qwen3-MoE's table (q/k/v biases, per-head q_norm and
k_norm under `qk_norm: head`, the dense layers' mlp.*_proj), the router's correction bias
(mlp.gate.e_score_correction_bias) and the ungated shared expert (mlp.shared_experts.*). The router's
weight and correction bias stay float32 whatever the model's dtype, as transformers keeps them."""

from __future__ import annotations

import dataclasses

from moejax.models import rows
from moejax.models.qwen3_moe.params import PARAMS as QWEN3_PARAMS


def _table() -> tuple:
    out = []
    for p in QWEN3_PARAMS:
        out.append(dataclasses.replace(p, f32=True) if p.name == "router" else p)  # HF keeps gate.weight fp32
        if p.name == "router":
            out.append(rows.router_bias("mlp.gate.e_score_correction_bias"))
    return tuple(out) + rows.shared_expert("mlp.shared_experts")


PARAMS = _table()
