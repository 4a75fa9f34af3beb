"""OLMoE's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations


from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_bool, hf_int, refuse, rope_to_hf


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of an OlmoeForCausalLM config.json; what moejax does not compute is refused."""
    refuse(c, path, (("hidden_act", "silu"), ("attention_bias", False)))
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    if heads <= 0 or hidden % heads:
        raise UserError(f"{path}: hidden_size={hidden} must be a positive multiple of num_attention_heads={heads}")
    clip = c.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise UserError(f"{path}: clip_qkv={repr(clip)[:40]} must be a positive number or null")
    return {**common_fields(c, path, num_experts=hf_int(c, "num_experts", path),
                            expert_ffn=hf_int(c, "intermediate_size", path), head_dim=hidden // heads, theta=10000.0,
                            eps=1e-5, aux_coef=0.01),
            "family": "olmoe", "qk_norm": "proj", "norm_topk_prob": hf_bool(c, "norm_topk_prob", path, False),
            "clip_qkv": None if clip is None else float(clip)}


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise UserError(f"config {cfg.name}: OlmoeForCausalLM needs head_dim x num_heads = d_model "
                        f"({cfg.head_dim} x {cfg.num_heads} != {cfg.d_model})")
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "clip_qkv": cfg.clip_qkv, "dtype": cfg.param_dtype, "hidden_act": "silu", "hidden_size": cfg.d_model,
        "initializer_range": 0.02, "intermediate_size": cfg.expert_ffn, "max_position_embeddings": cfg.max_seq_len,
        "norm_topk_prob": cfg.norm_topk_prob, "num_attention_heads": cfg.num_heads,
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
        "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
        "output_router_logits": False, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_to_hf(cfg), "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
