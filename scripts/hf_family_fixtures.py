#!/usr/bin/env python
"""Reference checkpoints of the MoE families moejax implements beside Mixtral, made by Hugging Face
transformers (the `.[hf]` extra: pip install -e '.[hf]'). Not run in CI: CI reads what this wrote.

    python scripts/hf_family_fixtures.py [--out tests/data]

For each family: a tiny random model (float32, eager attention), every tensor perturbed after init
(norm weights are not 1, so a missing norm cannot hide), saved with `save_pretrained` (the hub's
per-expert layout), and `reference.npz` with
  input_ids [2, 24]      numpy.random.default_rng(0).integers(0, 256, size=(2, 24))
  logits [2, 24, 256]    the full forward of input_ids, no cache
  generated_ids [2, 12]  greedy continuation (KV cache, EOS disabled)
  ce_loss, aux_loss      model(input_ids, labels=input_ids, output_router_logits=True): next-token
                         cross-entropy and the load-balancing loss (before its coefficient; NaN for a
                         family without one: GLM-4.5)
and `grads.npz`: d loss / d every parameter (loss as above: CE + coefficient x aux) of the saved
model, keyed by the hub's tensor names (transformers 5.x's fused expert tensors split back per expert).

Qwen2-MoE's fixture ties the head to the embedding, makes layer 2 dense and scales RoPE linearly; GLM-4.5's
makes layer 0 dense, limits routing to 2 of 4 expert groups, scales the routed weights by 2.5 and
uses yarn RoPE (original length 16, so the 24 + 12 positions reach past it); DeepSeek-V3's has latent
attention with a low-rank query, a value dim unlike the key's, interleaved RoPE and yarn whose mscale
changes the softmax scale (factor 40), layer 0 dense, 2 of 4 expert groups; GPT-OSS's alternates a
sliding window of 8 with full attention on its 2 layers (one of each per stage on a 2-stage mesh), uses
yarn RoPE with truncate false, and clamps its experts at 0.2, which the tiny model's activations
reach: each term moejax implements is exercised against transformers' numbers. GPT-OSS's hub layout
keeps each layer's experts fused (gate_up_proj [E, D, 2F], gate and up interleaved), and its grads.npz
keeps those names.
"""

import argparse
import os

import numpy as np
import torch
import transformers


def qwen3_moe():
    return transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden / heads on purpose
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, router_aux_loss_coef=0.001, attn_implementation="eager")


def olmoe():
    return transformers.OlmoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
        pad_token_id=1, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=256, router_aux_loss_coef=0.01, tie_word_embeddings=False,
        attn_implementation="eager")


def qwen2_moe():
    return transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[2], shared_expert_intermediate_size=64, qkv_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, router_aux_loss_coef=0.001, use_sliding_window=False,
        attn_implementation="eager")


def glm4_moe():
    return transformers.Glm4MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0},
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, num_nextn_predict_layers=0,
        attn_implementation="eager")


def gpt_oss():
    return transformers.GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], attention_bias=True, swiglu_alpha=1.702,
        swiglu_limit=0.2,  # the tiny model's gate and up values reach it (7.0 in the published models)
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, router_aux_loss_coef=0.01,
        attn_implementation="eager")


def deepseek_v3():
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,  # v != nope
        rope_interleave=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=1, attn_implementation="eager")


FAMILIES = {"qwen3-moe": (qwen3_moe, transformers.Qwen3MoeForCausalLM), "olmoe": (olmoe, transformers.OlmoeForCausalLM),
            "qwen2-moe": (qwen2_moe, transformers.Qwen2MoeForCausalLM),
            "glm4-moe": (glm4_moe, transformers.Glm4MoeForCausalLM),
            "gpt-oss": (gpt_oss, transformers.GptOssForCausalLM),
            "deepseek-v3": (deepseek_v3, transformers.DeepseekV3ForCausalLM)}
FUSED_HUB = ("gpt-oss",)  # families whose hub checkpoints keep each layer's experts in one tensor


def hub_grads(model, fused: bool = False) -> dict:
    """d loss / d parameter by the hub's names: fused [E, 2F, D] / [E, D, F] expert grads split per expert
    (`fused`: kept, the hub's layout)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
        if fused:
            out[name] = g
        elif name.endswith("experts.gate_up_proj"):
            f = g.shape[1] // 2
            for e in range(g.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = g[e, :f]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = g[e, f:]
        elif name.endswith("experts.down_proj"):
            for e in range(g.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = g[e]
        else:
            out[name] = g
    return out


def grads(d: str, cls, ids, fused: bool = False) -> None:
    """grads.npz of the saved model at `d` (loaded back, as moejax imports it)."""
    model = cls.from_pretrained(d, attn_implementation="eager").eval()
    x = torch.tensor(ids)
    model(x, labels=x, output_router_logits=True).loss.backward()
    np.savez(os.path.join(d, "grads.npz"), **hub_grads(model, fused))


def make(name: str, out: str) -> None:
    config_fn, cls = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(config_fn()).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms of one and zero biases would hide a missing term
            p.add_(0.05 * torch.randn_like(p) if p.ndim == 1 else 0.02 * torch.randn_like(p))
        for buf_name, b in model.named_buffers():  # a zero correction bias would hide a router that ignores it
            if buf_name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
    d = os.path.join(out, f"hf-{name}-tiny")
    model.save_pretrained(d, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    x = torch.tensor(ids)
    with torch.no_grad():
        logits = model(x).logits.numpy()
        out = model(x, labels=x, output_router_logits=True)
        aux = float(out.aux_loss) if getattr(out, "aux_loss", None) is not None else float("nan")
        ce = float(out.loss) - (getattr(model.config, "router_aux_loss_coef", 0.0) * aux if aux == aux else 0.0)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0,
                             min_new_tokens=12)
    np.savez(os.path.join(d, "reference.npz"), input_ids=ids, logits=logits, generated_ids=gen[:, ids.shape[1]:].numpy(),
             ce_loss=ce, aux_loss=aux)
    grads(d, cls, ids, name in FUSED_HUB)
    print(f"{d}: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data"))
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--grads-only", action="store_true", help="only (re)write grads.npz of existing fixtures")
    args = ap.parse_args()
    for name in args.family or sorted(FAMILIES):
        if args.grads_only:
            d = os.path.join(args.out, f"hf-{name}-tiny")
            grads(d, FAMILIES[name][1], np.load(os.path.join(d, "reference.npz"))["input_ids"], name in FUSED_HUB)
        else:
            make(name, args.out)


if __name__ == "__main__":
    main()
