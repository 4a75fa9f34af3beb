"""Mixtral's Hugging Face config.json <-> ModelConfig fields."""

from __future__ import annotations

import os

from moejax.config.model import ModelConfig
from moejax.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")


def config_from_hf(c: dict, path: str) -> dict:
    """ModelConfig fields of a MixtralForCausalLM config.json (what moejax cannot compute is refused)."""
    refuse = [("sliding_window", None), ("tie_word_embeddings", False), ("hidden_act", "silu"),
              ("attention_bias", False), ("mlp_bias", False)]
    for field, ok in refuse:
        if c.get(field, ok) != ok:
            raise UserError(f"{path}: {field}={repr(c[field])[:80]} is not supported by moejax (needs {ok!r})")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    for field, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {field} must be a JSON object, not {type(value).__name__}")
        if value.get("rope_type", value.get("type", "default")) != "default":
            raise UserError(f"{path}: {field} rope_type={value.get('rope_type', value.get('type'))!r} is not "
                            f"supported (moejax implements default RoPE)")
    heads = _int(c, "num_attention_heads", path)
    hidden = _int(c, "hidden_size", path)
    head_dim = c.get("head_dim")
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise UserError(f"{path}: no head_dim, and hidden_size={hidden} is not a positive multiple of "
                            f"num_attention_heads={heads}")
        head_dim = hidden // heads
    dtype = c.get("dtype") or c.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise UserError(f"{path}: dtype={repr(dtype)[:40]} is not supported; valid: {', '.join(_DTYPES)}")
    eos = c.get("eos_token_id")
    return {
        "num_layers": _int(c, "num_hidden_layers", path), "num_experts": _int(c, "num_local_experts", path),
        "experts_per_token": _int(c, "num_experts_per_tok", path), "d_model": hidden, "num_heads": heads,
        "head_dim": _int({"head_dim": head_dim}, "head_dim", path),
        "num_kv_heads": _int(c, "num_key_value_heads", path, default=heads),
        "expert_ffn": _int(c, "intermediate_size", path), "vocab_size": _int(c, "vocab_size", path),
        "rope_theta": _num(rope if "rope_theta" in rope else c, "rope_theta", path, 1e6),
        "rms_norm_eps": _num(c, "rms_norm_eps", path, 1e-5), "param_dtype": dtype,
        "max_seq_len": _int(c, "max_position_embeddings", path, default=4096),
        "bos_token_id": _int(c, "bos_token_id", path, default=1),
        "eos_token_id": eos if isinstance(eos, int) and not isinstance(eos, bool) else 2,
        "router_aux_loss_coef": _num(c, "router_aux_loss_coef", path, 0.001),
        "family": "mixtral",
        "description": f"imported from Hugging Face {os.path.basename(os.path.dirname(os.path.abspath(path)))}",
    }


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": cfg.param_dtype,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "intermediate_size": cfg.expert_ffn, "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads, "num_experts_per_tok": cfg.experts_per_token,
        "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
        "num_local_experts": cfg.num_experts, "output_router_logits": False, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def _int(c: dict, field: str, path: str, default: int | None = None) -> int:
    """An integer field of config.json (missing: `default`, or a one-line error)."""
    v = c.get(field)
    if v is None:
        if default is None:
            raise UserError(f"{path}: missing field {field!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{path}: {field}={repr(v)[:40]} must be an integer")
    return v


def _num(c: dict, field: str, path: str, default: float) -> float:
    v = c.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{path}: {field}={repr(v)[:40]} must be a number")
    try:
        return float(v)
    except OverflowError:
        raise UserError(f"{path}: {field}={repr(v)[:40]} is out of range") from None
