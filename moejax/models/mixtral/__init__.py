"""Mixtral (MixtralForCausalLM): grouped-query attention with RoPE, then a softmax top-k router (top-k
probabilities renormalised) over SwiGLU experts, every layer. The first family."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.mixtral.hf import config_from_hf, config_to_hf
from moejax.models.mixtral.params import PARAMS

FAMILY = Family(model_type="mixtral", hf_architecture="MixtralForCausalLM", params=PARAMS, layer=attention_moe_layer,
                config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("qk_norm", "none"), ("attention_bias", False), ("dense_layers", ()),
                       ("shared_expert_ffn", 0), ("router", "softmax_topk")))
