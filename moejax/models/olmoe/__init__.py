"""OLMoE (OlmoeForCausalLM: OLMoE-1B-7B): Qwen3-MoE's layer names, with RMSNorm over the whole q and
k projections (`qk_norm: proj`: under tensor parallelism its mean of squares sums over tp), an
optional clamp of q, k and v (`clip_qkv`), and raw top-k softmax weights (`norm_topk_prob: false`)."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.olmoe.hf import config_from_hf, config_to_hf
from moejax.models.olmoe.params import PARAMS

FAMILY = Family(model_type="olmoe", hf_architecture="OlmoeForCausalLM", params=PARAMS, layer=attention_moe_layer,
                config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("qk_norm", "proj"), ("shared_expert_ffn", 0), ("router", "softmax_topk")))
