"""Mixtral (MixtralForCausalLM): grouped-query attention with RoPE, then a softmax top-k router over
SwiGLU experts, every layer. The first family: its table, layer and HF mapping define the others'."""

from moejax.models.family import Family
from moejax.models.mixtral.hf import config_from_hf, config_to_hf
from moejax.models.mixtral.layer import layer
from moejax.models.mixtral.params import PARAMS

FAMILY = Family(model_type="mixtral", hf_architecture="MixtralForCausalLM", params=PARAMS, layer=layer,
                router="softmax_topk", config_from_hf=config_from_hf, config_to_hf=config_to_hf)
