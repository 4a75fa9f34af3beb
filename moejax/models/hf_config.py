"""Reading a Hugging Face config.json's fields, for the families' config mappings: every missing or
malformed field is a one-line UserError naming it, never a KeyError or a bad value passed on."""

from __future__ import annotations

import os

from moejax.config.model import ROPE_KEYS, ROPE_TYPES
from moejax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def hf_int(c: dict, field: str, path: str, default: int | None = None) -> int:
    """An integer field (missing or null: `default`, or a one-line error)."""
    v = c.get(field)
    if v is None:
        if default is None:
            raise UserError(f"{path}: missing field {field!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{path}: {field}={repr(v)[:40]} must be an integer")
    return v


def hf_bool(c: dict, field: str, path: str, default: bool) -> bool:
    v = c.get(field, default)
    if not isinstance(v, bool):
        raise UserError(f"{path}: {field}={repr(v)[:40]} must be true or false")
    return v


def hf_num(c: dict, field: str, path: str, default: float) -> float:
    v = c.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{path}: {field}={repr(v)[:40]} must be a number")
    try:
        return float(v)
    except OverflowError:
        raise UserError(f"{path}: {field}={repr(v)[:40]} is out of range") from None


def read_dtype(c: dict, path: str) -> str:
    dtype = c.get("dtype") or c.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise UserError(f"{path}: dtype={repr(dtype)[:40]} is not supported; valid: {', '.join(DTYPES)}")
    return dtype


def rope_fields(c: dict, path: str, theta: float, partial: float = 1.0) -> dict:
    """rope_theta, rope_scaling and partial_rotary_factor as transformers 5.x standardizes them: a legacy
    `rope_scaling` object replaces `rope_parameters`; rope_theta and partial_rotary_factor come from that
    object, else the top level, else the family's default; yarn's original_max_position_embeddings is a
    top-level one, else the object's, else max_position_embeddings, and its missing factor is
    max_position_embeddings / original. RoPE scaling other than default, linear and yarn is refused."""
    for field in ("rope_parameters", "rope_scaling"):
        if c.get(field) is not None and not isinstance(c[field], dict):
            raise UserError(f"{path}: {field} must be a JSON object, not {type(c[field]).__name__}")
    field = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    rope = dict(c.get(field) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"{path}: {field} rope_type={kind!r} is not supported (moejax implements "
                        f"{', '.join(ROPE_TYPES)})")
    if kind == "yarn":
        orig_field = "original_max_position_embeddings"
        if orig_field in c:
            rope[orig_field] = hf_int(c, orig_field, path)
        rope.setdefault(orig_field, hf_int(c, "max_position_embeddings", path, default=4096))
        if rope.get("factor") is None and isinstance(rope[orig_field], int) and rope[orig_field] > 0:
            rope["factor"] = hf_int(c, "max_position_embeddings", path, default=4096) / rope[orig_field]
    scaled = {k: rope[k] for k in ROPE_KEYS[kind] if rope.get(k) is not None}
    for k, v in scaled.items():
        if k != "truncate" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise UserError(f"{path}: rope {k}={repr(v)[:40]} must be a number")
    if kind != "default":
        scaled["rope_type"] = kind
    return {"rope_theta": hf_num(rope if "rope_theta" in rope else c, "rope_theta", path, theta),
            "rope_scaling": scaled,
            "partial_rotary_factor": hf_num(rope if "partial_rotary_factor" in rope else c, "partial_rotary_factor",
                                            path, partial)}


def rope_to_hf(cfg) -> dict:
    """config.json's `rope_parameters` of a config."""
    out = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope}
    if cfg.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = cfg.partial_rotary_factor
    return out


def refuse(c: dict, path: str, required: tuple) -> None:
    """(field, the only value moejax computes) pairs: anything else changes the math, so is refused."""
    for field, ok in required:
        if c.get(field, ok) != ok:
            raise UserError(f"{path}: {field}={repr(c[field])[:80]} is not supported by moejax (needs {ok!r})")


def common_fields(c: dict, path: str, *, num_experts: int, expert_ffn: int, head_dim: int, theta: float,
                  eps: float, aux_coef: float, partial_rotary: float = 1.0) -> dict:
    """The ModelConfig fields every family reads the same way from config.json, given the values whose
    field names or defaults differ between families."""
    heads = hf_int(c, "num_attention_heads", path)
    eos = c.get("eos_token_id")
    if isinstance(eos, list) and eos:  # several stop ids (GLM-4.5): moejax stops at the first one
        eos = eos[0]
    return {
        "num_layers": hf_int(c, "num_hidden_layers", path), "num_experts": num_experts,
        "experts_per_token": hf_int(c, "num_experts_per_tok", path), "d_model": hf_int(c, "hidden_size", path),
        "num_heads": heads, "head_dim": head_dim, "num_kv_heads": hf_int(c, "num_key_value_heads", path, default=heads),
        "expert_ffn": expert_ffn, "vocab_size": hf_int(c, "vocab_size", path),
        **rope_fields(c, path, theta, partial_rotary),
        "tie_word_embeddings": hf_bool(c, "tie_word_embeddings", path, False),
        "rms_norm_eps": hf_num(c, "rms_norm_eps", path, eps), "param_dtype": read_dtype(c, path),
        "max_seq_len": hf_int(c, "max_position_embeddings", path, default=4096),
        "bos_token_id": hf_int(c, "bos_token_id", path, default=1),
        "pad_token_id": c["pad_token_id"] if isinstance(c.get("pad_token_id"), int) and not isinstance(
            c.get("pad_token_id"), bool) and 0 <= c["pad_token_id"] < hf_int(c, "vocab_size", path) else None,
        "eos_token_id": eos if isinstance(eos, int) and not isinstance(eos, bool) else 2,
        "router_aux_loss_coef": hf_num(c, "router_aux_loss_coef", path, aux_coef),
        "description": f"imported from Hugging Face {os.path.basename(os.path.dirname(os.path.abspath(path)))}",
    }
