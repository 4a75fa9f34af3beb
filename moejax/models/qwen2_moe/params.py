"""Qwen2-MoE's parameters (models/family.py `Param`): Qwen3-MoE's table without q_norm and k_norm, plus
the shared expert (mlp.shared_expert.{gate,up,down}_proj) and its gate (mlp.shared_expert_gate)."""

from __future__ import annotations

from moejax.models import rows
from moejax.models.qwen3_moe.params import PARAMS as QWEN3_PARAMS

PARAMS = tuple(p for p in QWEN3_PARAMS if p.name not in ("q_norm", "k_norm")) + rows.shared_expert(
    "mlp.shared_expert", "mlp.shared_expert_gate.weight")
