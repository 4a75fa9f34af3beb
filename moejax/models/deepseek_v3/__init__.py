"""DeepSeek-V3 (DeepseekV3ForCausalLM: DeepSeek-V3, R1, V3.1; Kimi K2 is the same architecture):
multi-head latent attention (ops/mla.py: a low-rank query, keys and values expanded per head from a
cached latent and one shared RoPE key, interleaved RoPE, yarn with the mscale-adjusted softmax scale)
and GLM-4.5's MoE pieces: the sigmoid router whose correction bias only chooses, group-limited, the
weights renormalised and scaled by `routed_scaling_factor`, ungated shared experts, and dense FFNs on the
first `first_k_dense_replace` layers. No load-balancing loss (the correction bias balances, outside
gradients: `moejax train --bias-update-rate`). The multi-token-prediction layer is not read."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.deepseek_v3.hf import config_from_hf, config_to_hf
from moejax.models.deepseek_v3.params import PARAMS
from moejax.models.family import Family

FAMILY = Family(model_type="deepseek_v3", hf_architecture="DeepseekV3ForCausalLM", params=PARAMS,
                layer=attention_moe_layer, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("router", "sigmoid_topk"), ("shared_expert_gate", False), ("qk_norm", "none"),
                       ("attention_bias", False)), latent_attention=True)
