"""Qwen2-MoE's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations

from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_bool, hf_int, refuse
from moejax.models.qwen3_moe.hf import config_to_hf as qwen3_to_hf
from moejax.models.qwen3_moe.hf import dense_layers


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a Qwen2MoeForCausalLM config.json; what moejax does not compute is refused
    (sliding-window attention)."""
    refuse(c, path, (("use_sliding_window", False), ("hidden_act", "silu")))
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    if heads <= 0 or (hidden % heads and "head_dim" not in c):
        raise UserError(f"{path}: hidden_size={hidden} must be a positive multiple of num_attention_heads={heads}")
    shared = hf_int(c, "shared_expert_intermediate_size", path)
    if shared <= 0:
        raise UserError(f"{path}: shared_expert_intermediate_size={shared} must be positive (Qwen2-MoE always has "
                        f"a shared expert)")
    experts = hf_int(c, "num_experts", path) if "num_experts" in c else hf_int(c, "num_local_experts", path)
    return {**common_fields(c, path, num_experts=experts, expert_ffn=hf_int(c, "moe_intermediate_size", path),
                            head_dim=hf_int(c, "head_dim", path, default=hidden // heads), theta=10000.0, eps=1e-6,
                            aux_coef=0.001),
            **dense_layers(c, path, hf_int(c, "num_hidden_layers", path)),
            "family": "qwen2_moe", "norm_topk_prob": hf_bool(c, "norm_topk_prob", path, False),
            "attention_bias": hf_bool(c, "qkv_bias", path, True), "shared_expert_ffn": shared,
            "shared_expert_gate": True}


def config_to_hf(cfg: ModelConfig) -> dict:
    out = {k: v for k, v in qwen3_to_hf(cfg).items() if k not in ("attention_bias",)}
    return {**out, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "qkv_bias": cfg.attention_bias, "shared_expert_intermediate_size": cfg.shared_expert_ffn,
            "max_window_layers": cfg.num_layers}
