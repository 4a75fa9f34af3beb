"""GLM-4.5's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations

from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_bool, hf_int, hf_num, refuse, rope_to_hf


def sigmoid_moe_fields(c: dict, path: str, layers: int) -> dict:
    """The MoE fields DeepSeek-V3's layout shares (GLM-4.5 took it): the group-limited sigmoid router,
    n_shared_experts x moe_intermediate_size of ungated shared expert, the first_k_dense_replace dense
    layers of intermediate_size."""
    first_dense = hf_int(c, "first_k_dense_replace", path, default=1)
    if not 0 <= first_dense < layers:
        raise UserError(f"{path}: first_k_dense_replace={first_dense} must be in [0, num_hidden_layers={layers})")
    expert_ffn = hf_int(c, "moe_intermediate_size", path)
    return {"router": "sigmoid_topk", "norm_topk_prob": hf_bool(c, "norm_topk_prob", path, True),
            "n_group": hf_int(c, "n_group", path, default=1), "topk_group": hf_int(c, "topk_group", path, default=1),
            "routed_scaling_factor": hf_num(c, "routed_scaling_factor", path, 1.0),
            "shared_expert_ffn": expert_ffn * hf_int(c, "n_shared_experts", path, default=1),
            "dense_layers": list(range(first_dense)),
            "dense_ffn": hf_int(c, "intermediate_size", path) if first_dense else 0,
            "router_aux_loss_coef": 0.0}


def sigmoid_moe_to_hf(cfg: ModelConfig, architecture: str) -> dict:
    dense = list(cfg.dense_layers)
    if dense != list(range(len(dense))):
        raise UserError(f"config {cfg.name}: dense_layers={dense} are not the first layers: {architecture} "
                        f"only has first_k_dense_replace")
    if cfg.shared_expert_ffn % cfg.expert_ffn:
        raise UserError(f"config {cfg.name}: shared_expert_ffn={cfg.shared_expert_ffn} is not a multiple of "
                        f"expert_ffn={cfg.expert_ffn} (the shared experts are n_shared_experts x expert_ffn)")
    return {"first_k_dense_replace": len(dense), "intermediate_size": cfg.dense_ffn or cfg.expert_ffn,
            "moe_intermediate_size": cfg.expert_ffn, "n_group": cfg.n_group, "n_routed_experts": cfg.num_experts,
            "n_shared_experts": cfg.shared_expert_ffn // cfg.expert_ffn, "norm_topk_prob": cfg.norm_topk_prob,
            "num_experts_per_tok": cfg.experts_per_token, "routed_scaling_factor": cfg.routed_scaling_factor,
            "topk_group": cfg.topk_group}


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a Glm4MoeForCausalLM config.json; what moejax does not compute is refused.
    The multi-token-prediction layers past num_hidden_layers are not read (transformers ignores them)."""
    refuse(c, path, (("hidden_act", "silu"),))
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    if heads <= 0:
        raise UserError(f"{path}: num_attention_heads={heads} must be positive")
    layers = hf_int(c, "num_hidden_layers", path)
    experts = hf_int(c, "n_routed_experts", path) if "n_routed_experts" in c else hf_int(c, "num_local_experts", path)
    moe = sigmoid_moe_fields(c, path, layers)
    return {**common_fields(c, path, num_experts=experts, expert_ffn=hf_int(c, "moe_intermediate_size", path),
                            head_dim=hf_int(c, "head_dim", path, default=hidden // heads), theta=10000.0, eps=1e-5,
                            aux_coef=0.0, partial_rotary=0.5),
            **moe, "family": "glm4_moe", "qk_norm": "head" if hf_bool(c, "use_qk_norm", path, False) else "none",
            "attention_bias": hf_bool(c, "attention_bias", path, False)}


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "dtype": cfg.param_dtype, "head_dim": cfg.head_dim, **sigmoid_moe_to_hf(cfg, "Glm4MoeForCausalLM"),
        "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads, "num_nextn_predict_layers": 0,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "use_qk_norm": cfg.qk_norm == "head",
        "vocab_size": cfg.vocab_size,
    }
