"""Parameter rows (models/family.py `Param`) that several families' tables share: attention biases,
shared experts, dense layers' FFN and the correction bias of sigmoid routers. Each exists only
under the configs that have it (`when`); the HF names of the MoE block's parts are the family's.

Logical axes: a dense FFN's hidden dim is `ffn` (tp, like Megatron's MLP); the correction bias is
replicated like the router. Tensors of MoE layers stack the MoE layers only (`kind="moe"`), a dense
FFN's the dense layers only (`kind="dense"`).
"""

from __future__ import annotations

from moejax.models.family import Param

L = "model.layers.{l}."


def attention_biases() -> tuple:
    """q, k, v projection biases (HF [H*K] vectors), under `attention_bias`."""
    def bias(name, hf, heads, axis):
        return Param(name, lambda c, h=heads: (c.num_layers, h(c), c.head_dim), ("layers", axis, None),
                     hf=L + f"self_attn.{hf}.bias", hf_vector=True, init="zeros", when=lambda c: c.attention_bias)
    return (bias("bq", "q_proj", lambda c: c.num_heads, "heads"),
            bias("bk", "k_proj", lambda c: c.num_kv_heads, "kv_heads"),
            bias("bv", "v_proj", lambda c: c.num_kv_heads, "kv_heads"))


def swiglu_rows(prefix: str, hf: str, kind: str, size, when) -> tuple:
    """A dense SwiGLU (gate, up, down) with its hidden dim `size(cfg)` over tp: `prefix`_w1/_w3/_w2
    [L_kind, D, F] / [L_kind, F, D], HF `hf`.{gate,up,down}_proj.weight."""
    return (
        Param(f"{prefix}_w1", lambda c: (len(c.kind_layers(kind)), c.d_model, size(c)), ("layers", None, "ffn"),
              quant_dims=(1,), hf=L + hf + ".gate_proj.weight", hf_transpose=True, kind=kind, when=when),
        Param(f"{prefix}_w3", lambda c: (len(c.kind_layers(kind)), c.d_model, size(c)), ("layers", None, "ffn"),
              quant_dims=(1,), hf=L + hf + ".up_proj.weight", hf_transpose=True, kind=kind, when=when),
        Param(f"{prefix}_w2", lambda c: (len(c.kind_layers(kind)), size(c), c.d_model), ("layers", "ffn", None),
              quant_dims=(1,), hf=L + hf + ".down_proj.weight", hf_transpose=True, kind=kind, when=when),
    )


def dense_layer_ffn() -> tuple:
    """The FFN of the layers in `dense_layers` (HF `mlp.{gate,up,down}_proj`)."""
    return swiglu_rows("dense", "mlp", "dense", lambda c: c.dense_ffn, lambda c: bool(c.dense_layers))


def shared_expert(hf: str, gate_hf: str = "") -> tuple:
    """A shared expert at `hf` (Qwen2-MoE: mlp.shared_expert, DeepSeek / GLM: mlp.shared_experts) and,
    under `shared_expert_gate`, its sigmoid gate [L_moe, D, 1] (HF Linear(D, 1) at `gate_hf`)."""
    rows = swiglu_rows("shared", hf, "moe", lambda c: c.shared_expert_ffn, lambda c: c.shared_expert_ffn > 0)
    if gate_hf:
        rows += (Param("shared_gate", lambda c: (len(c.moe_layers), c.d_model, 1), ("layers", None, None),
                       hf=L + gate_hf, hf_transpose=True, kind="moe", when=lambda c: c.shared_expert_gate),)
    return rows


def router_bias(hf: str) -> Param:
    """The sigmoid router's correction bias [L_moe, E]: added to the scores only to choose experts;
    trained by a balancing rule, not by gradients (HF keeps it float32 and zero-initialised)."""
    return Param("router_bias", lambda c: (len(c.moe_layers), c.num_experts), ("layers", None), hf=L + hf,
                 init="zeros", kind="moe", trained=False, f32=True, when=lambda c: c.router == "sigmoid_topk")
