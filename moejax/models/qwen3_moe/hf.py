"""Qwen3-MoE's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations


from moejax.config.model import ModelConfig
from moejax.errors import UserError
from moejax.models.hf_config import common_fields, hf_bool, hf_int, refuse, rope_to_hf


def dense_layers(c: dict, path: str, layers: int) -> dict:
    """Qwen's dense layers: layer i is MoE iff i is not in mlp_only_layers and (i + 1) is a multiple of
    decoder_sparse_step; the others run a dense SwiGLU of intermediate_size."""
    only = c.get("mlp_only_layers") or []
    step = hf_int(c, "decoder_sparse_step", path, default=1)
    if not (isinstance(only, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in only)) or step < 1:
        raise UserError(f"{path}: mlp_only_layers={repr(only)[:60]} must be a list of layer indices and "
                        f"decoder_sparse_step={step!r} a positive integer")
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    return {"dense_layers": dense, "dense_ffn": hf_int(c, "intermediate_size", path) if dense else 0}


def dense_to_hf(cfg: ModelConfig) -> dict:
    return {"decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layers),
            "intermediate_size": cfg.dense_ffn or cfg.expert_ffn}


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a Qwen3MoeForCausalLM config.json; what moejax does not compute is refused."""
    refuse(c, path, (("use_sliding_window", False), ("hidden_act", "silu")))
    heads = hf_int(c, "num_attention_heads", path)
    hidden = hf_int(c, "hidden_size", path)
    if heads <= 0:
        raise UserError(f"{path}: num_attention_heads={heads} must be positive")
    experts = hf_int(c, "num_experts", path) if "num_experts" in c else hf_int(c, "num_local_experts", path)
    return {**common_fields(c, path, num_experts=experts, expert_ffn=hf_int(c, "moe_intermediate_size", path),
                            head_dim=hf_int(c, "head_dim", path, default=hidden // heads if hidden % heads == 0 else 0),
                            theta=10000.0, eps=1e-6, aux_coef=0.001),
            **dense_layers(c, path, hf_int(c, "num_hidden_layers", path)),
            "family": "qwen3_moe", "qk_norm": "head", "norm_topk_prob": hf_bool(c, "norm_topk_prob", path, False),
            "attention_bias": hf_bool(c, "attention_bias", path, False)}


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        **dense_to_hf(cfg), "dtype": cfg.param_dtype, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "moe_intermediate_size": cfg.expert_ffn,
        "max_position_embeddings": cfg.max_seq_len, "norm_topk_prob": cfg.norm_topk_prob,
        "num_attention_heads": cfg.num_heads, "num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads, "output_router_logits": False, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_to_hf(cfg), "router_aux_loss_coef": cfg.router_aux_loss_coef, "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }
