"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, Qwen3-235B-A22B): Mixtral's layer with a head_dim
decoupled from d_model / heads, per-head RMSNorm of q and k before RoPE (`qk_norm: head`), and a
softmax top-k router whose top-k renormalisation is the config's `norm_topk_prob`."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.qwen3_moe.hf import config_from_hf, config_to_hf
from moejax.models.qwen3_moe.params import PARAMS

FAMILY = Family(model_type="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM", params=PARAMS,
                layer=attention_moe_layer, config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, fixed=(("qk_norm", "head"), ("shared_expert_ffn", 0), ("router", "softmax_topk")))
