"""GLM-4.5 (Glm4MoeForCausalLM: GLM-4.5, 4.6, 4.5-Air): grouped-query attention with q/k/v biases,
optional per-head QK-norm and partial RoPE (the first half of each head's dims by default); DeepSeek-V3's
MoE: a sigmoid router whose correction bias only chooses, group-limited, weights renormalised and
scaled by `routed_scaling_factor`, plus an ungated shared expert; the first `first_k_dense_replace`
layers are dense. No load-balancing loss (the correction bias balances, outside gradients)."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.glm4_moe.hf import config_from_hf, config_to_hf
from moejax.models.glm4_moe.params import PARAMS

FAMILY = Family(model_type="glm4_moe", hf_architecture="Glm4MoeForCausalLM", params=PARAMS,
                layer=attention_moe_layer, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("router", "sigmoid_topk"), ("shared_expert_gate", False)))
