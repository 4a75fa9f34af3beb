"""DeepSeek-V3's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations

from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.glm4_moe.hf import sigmoid_moe_fields, sigmoid_moe_to_hf
from moejax.models.hf_config import common_fields, hf_bool, hf_int, refuse, rope_to_hf


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a DeepseekV3ForCausalLM config.json (Kimi K2's too); what moejax does not
    compute is refused. scoring_func and topk_method are not read: transformers hard-codes the sigmoid
    router. The multi-token-prediction layers past num_hidden_layers are not read (nor loaded by
    transformers); the import says so."""
    refuse(c, path, (("hidden_act", "silu"), ("attention_bias", False)))
    heads = hf_int(c, "num_attention_heads", path)
    if heads <= 0:
        raise UserError(f"{path}: num_attention_heads={heads} must be positive")
    if hf_int(c, "num_key_value_heads", path, default=heads) != heads:
        raise UserError(f"{path}: num_key_value_heads={c['num_key_value_heads']} must equal num_attention_heads="
                        f"{heads} (kv_b_proj expands one key and value per head)")
    rope, nope = hf_int(c, "qk_rope_head_dim", path, default=64), hf_int(c, "qk_nope_head_dim", path, default=128)
    experts = hf_int(c, "n_routed_experts", path) if "n_routed_experts" in c else hf_int(c, "num_local_experts", path)
    return {**common_fields(c, path, num_experts=experts, expert_ffn=hf_int(c, "moe_intermediate_size", path),
                            head_dim=nope + rope, theta=10000.0, eps=1e-6, aux_coef=0.0),
            **sigmoid_moe_fields(c, path, hf_int(c, "num_hidden_layers", path)), "family": "deepseek_v3",
            "kv_lora_rank": hf_int(c, "kv_lora_rank", path, default=512),
            "q_lora_rank": hf_int(c, "q_lora_rank", path, default=0), "qk_rope_head_dim": rope,
            "v_head_dim": hf_int(c, "v_head_dim", path, default=128),
            "rope_interleave": hf_bool(c, "rope_interleave", path, True)}


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "dtype": cfg.param_dtype, **sigmoid_moe_to_hf(cfg, "DeepseekV3ForCausalLM"),
        "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "kv_lora_rank": cfg.kv_lora_rank, "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_heads, "num_nextn_predict_layers": 0,
        "q_lora_rank": cfg.q_lora_rank or None, "qk_nope_head_dim": cfg.head_dim - cfg.qk_rope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_interleave": cfg.rope_interleave, "rope_parameters": rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "v_head_dim": cfg.v_head_dim,
        "vocab_size": cfg.vocab_size,
    }
