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
                         cross-entropy and the load-balancing loss (before its coefficient)
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


FAMILIES = {"qwen3-moe": (qwen3_moe, transformers.Qwen3MoeForCausalLM), "olmoe": (olmoe, transformers.OlmoeForCausalLM)}


def make(name: str, out: str) -> None:
    config_fn, cls = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(config_fn()).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms of one and zero biases would hide a missing term
            p.add_(0.05 * torch.randn_like(p) if p.ndim == 1 else 0.02 * torch.randn_like(p))
    d = os.path.join(out, f"hf-{name}-tiny")
    model.save_pretrained(d, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    x = torch.tensor(ids)
    with torch.no_grad():
        logits = model(x).logits.numpy()
        out = model(x, labels=x, output_router_logits=True)
        aux = float(out.aux_loss)
        ce = float(out.loss) - model.config.router_aux_loss_coef * aux
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0,
                             min_new_tokens=12)
    np.savez(os.path.join(d, "reference.npz"), input_ids=ids, logits=logits, generated_ids=gen[:, ids.shape[1]:].numpy(),
             ce_loss=ce, aux_loss=aux)
    print(f"{d}: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data"))
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    args = ap.parse_args()
    for name in args.family or sorted(FAMILIES):
        make(name, args.out)


if __name__ == "__main__":
    main()
