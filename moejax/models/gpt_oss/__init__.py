"""GPT-OSS (GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b): grouped-query attention with q/k/v/o biases
and a learnt sink logit per head in each softmax's denominator; layers alternate between a sliding
window and full attention (`layer_types`); yarn RoPE (truncate: false); a softmax top-k router whose
logits have a bias, weighting the k chosen by the softmax of their logits; experts with biases and a
clamped SwiGLU, (clip(up) + 1) * g * sigmoid(1.702 g) with g = min(gate, 7); norms kept and scaled in
float32. Mixtral's load-balancing loss, over the biased logits."""

from moejax.models.blocks import attention_moe_layer
from moejax.models.family import Family
from moejax.models.gpt_oss.hf import config_from_hf, config_to_hf
from moejax.models.gpt_oss.params import PARAMS

FAMILY = Family(model_type="gpt_oss", hf_architecture="GptOssForCausalLM", params=PARAMS, layer=attention_moe_layer,
                config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                fixed=(("qk_norm", "none"), ("dense_layers", ()), ("shared_expert_ffn", 0), ("router", "softmax_topk"),
                       ("norm_topk_prob", True), ("attention_sinks", True), ("router_logit_bias", True),
                       ("expert_bias", True), ("swiglu_up_offset", 1.0)))
