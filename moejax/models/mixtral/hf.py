"""Mixtral's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations


from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_int, refuse, rope_to_hf


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a MixtralForCausalLM config.json (what moejax cannot compute is refused)."""
    refuse(c, path, (("sliding_window", None), ("hidden_act", "silu"),
                     ("attention_bias", False), ("mlp_bias", False)))
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    head_dim = c.get("head_dim")
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise UserError(f"{path}: no head_dim, and hidden_size={hidden} is not a positive multiple of "
                            f"num_attention_heads={heads}")
        head_dim = hidden // heads
    return {**common_fields(c, path, num_experts=hf_int(c, "num_local_experts", path),
                            expert_ffn=hf_int(c, "intermediate_size", path),
                            head_dim=hf_int({"head_dim": head_dim}, "head_dim", path), theta=1e6, eps=1e-5,
                            aux_coef=0.001),
            "family": "mixtral"}


def config_to_hf(cfg: ModelConfig) -> dict:
    if not cfg.norm_topk_prob:
        raise UserError(f"config {cfg.name}: norm_topk_prob=false has no MixtralForCausalLM equivalent (Mixtral "
                        f"always renormalises its top-k weights): it cannot be exported as Mixtral")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "dtype": cfg.param_dtype,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "intermediate_size": cfg.expert_ffn, "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads, "num_experts_per_tok": cfg.experts_per_token,
        "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
        "num_local_experts": cfg.num_experts, "output_router_logits": False, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_to_hf(cfg), "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0, "sliding_window": None, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
