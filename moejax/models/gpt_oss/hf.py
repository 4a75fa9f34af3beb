"""GPT-OSS's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations

from moejax.config.model import LAYER_TYPES, ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_bool, hf_int, hf_num, rope_to_hf

# transformers' GptOssConfig when config.json gives no RoPE (rope_theta: its default_theta)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def layer_types(c: dict, path: str, layers: int) -> dict:
    """layer_types (transformers' default: layer i slides when i is even) and sliding_window."""
    types = c.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if not (isinstance(types, list) and len(types) == layers and all(t in LAYER_TYPES for t in types)):
        raise UserError(f"{path}: layer_types={repr(types)[:80]} must list one of {', '.join(LAYER_TYPES)} for each "
                        f"of the {layers} layers")
    window = c.get("sliding_window", 128)
    if "sliding_attention" in types and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise UserError(f"{path}: sliding_window={repr(window)[:40]} must be a positive integer (layer_types has "
                        f"sliding_attention layers)")
    return {"layer_types": list(types), "sliding_window": window if "sliding_attention" in types else None}


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a GptOssForCausalLM config.json. hidden_act is not read: transformers'
    experts apply their own clamped SwiGLU."""
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    if heads <= 0:
        raise UserError(f"{path}: num_attention_heads={heads} must be positive")
    if c.get("rope_parameters") is None and c.get("rope_scaling") is None:
        c = {**c, "rope_parameters": DEFAULT_ROPE}
    bias = hf_bool(c, "attention_bias", path, True)
    return {**common_fields(c, path, num_experts=hf_int(c, "num_local_experts", path),
                            expert_ffn=hf_int(c, "intermediate_size", path),
                            head_dim=hf_int(c, "head_dim", path, default=hidden // heads), theta=150000.0, eps=1e-5,
                            aux_coef=0.001),
            **layer_types(c, path, hf_int(c, "num_hidden_layers", path)),
            "family": "gpt_oss", "attention_bias": bias, "attention_out_bias": bias, "attention_sinks": True,
            "router_logit_bias": True, "expert_bias": True, "norm_topk_prob": True,
            "swiglu_alpha": hf_num(c, "swiglu_alpha", path, 1.702), "swiglu_limit": hf_num(c, "swiglu_limit", path, 7.0),
            "swiglu_up_offset": 1.0}


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.attention_bias != cfg.attention_out_bias:
        raise UserError(f"config {cfg.name}: attention_bias={cfg.attention_bias} and attention_out_bias="
                        f"{cfg.attention_out_bias} differ: GptOssForCausalLM has one attention_bias for q, k, v and o")
    if cfg.swiglu_limit is None:
        raise UserError(f"config {cfg.name}: swiglu_limit=null has no GptOssForCausalLM equivalent (its experts "
                        f"always clamp)")
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "dtype": cfg.param_dtype, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "hidden_size": cfg.d_model, "initializer_range": 0.02, "intermediate_size": cfg.expert_ffn,
        "layer_types": list(cfg.layer_types) or ["full_attention"] * cfg.num_layers,
        "max_position_embeddings": cfg.max_seq_len, "num_attention_heads": cfg.num_heads,
        "num_experts_per_tok": cfg.experts_per_token, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads, "num_local_experts": cfg.num_experts, "output_router_logits": False,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope_to_hf(cfg),
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "sliding_window": cfg.sliding_window,
        "swiglu_alpha": cfg.swiglu_alpha, "swiglu_limit": cfg.swiglu_limit,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
