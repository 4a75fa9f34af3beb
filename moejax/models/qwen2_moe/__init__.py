"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen3-MoE's layer without QK-norm,
with q/k/v biases (`qkv_bias`), and beside the routed experts a shared SwiGLU expert on every token
scaled by a sigmoid gate; layers in `mlp_only_layers` (or off `decoder_sparse_step`) are dense."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.qwen2_moe.hf import config_from_hf, config_to_hf
from moejax.models.qwen2_moe.params import PARAMS

FAMILY = Family(model_type="qwen2_moe", hf_architecture="Qwen2MoeForCausalLM", params=PARAMS,
                layer=attention_moe_layer, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("qk_norm", "none"), ("router", "softmax_topk"), ("shared_expert_gate", True)))
