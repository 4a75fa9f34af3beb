"""Routers: how each token picks its experts and with what weights. A config names its router
(`ModelConfig.router`); each returns

  score_NE  what a chosen expert's weight is read from (before renormalising and routed scaling)
  experts_NK  the chosen experts, best first
  probs_NE  softmax over all experts of the router logits: the load-balancing loss's (HF's
            `load_balancing_loss_func` takes the softmax whatever the router)
  lse_N     each token's logsumexp of the logits (the z-loss's)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops.layers import F32, mm

I32 = jnp.int32


def softmax_topk(h_ND, w, top_k: int, n_group: int = 1, topk_group: int = 1, bias_E=None):
    """Router logits in the model dtype (plus a learnt bias: GPT-OSS), softmax in float32, top-k
    (Mixtral, Qwen, OLMoE, GPT-OSS: its softmax over the k chosen logits is these probabilities
    renormalised)."""
    logits_NE = mm("nd,de->ne", h_ND, w["router"])
    if bias_E is not None:
        logits_NE = logits_NE + bias_E
    logits_NE = logits_NE.astype(h_ND.dtype).astype(F32)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, experts_NK = jax.lax.top_k(probs_NE, top_k)
    return probs_NE, experts_NK.astype(I32), probs_NE, jax.nn.logsumexp(logits_NE, axis=-1)


def sigmoid_topk(h_ND, w, top_k: int, n_group: int = 1, topk_group: int = 1, bias_E=None):
    """DeepSeek-V3's router (GLM-4.5's too), in float32: sigmoid scores; the correction bias
    `router_bias` is added only to choose; the experts split into n_group groups, each scored by the
    sum of its best two, and a token chooses among the topk_group best groups only. The weights are
    the unbiased scores (renormalising and routed scaling follow in dispatch.moe_block)."""
    logits_NE = mm("nd,de->ne", h_ND.astype(F32), w["router"].astype(F32))
    if bias_E is not None:  # a bias of the logits (ModelConfig.router_logit_bias), unlike router_bias
        logits_NE = logits_NE + bias_E.astype(F32)
    score_NE = jax.nn.sigmoid(logits_NE)
    choice_NE = score_NE + w["router_bias"].astype(F32)
    n, e = choice_NE.shape
    if n_group > 1:
        grouped_NGR = choice_NE.reshape(n, n_group, e // n_group)
        group_NG = jnp.sum(jax.lax.top_k(grouped_NGR, 2)[0], axis=-1)
        _, keep_NJ = jax.lax.top_k(group_NG, topk_group)
        keep_NG = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], keep_NJ].set(True)
        choice_NE = jnp.where(jnp.repeat(keep_NG, e // n_group, axis=1), choice_NE, -jnp.inf)
    _, experts_NK = jax.lax.top_k(choice_NE, top_k)
    return score_NE, experts_NK.astype(I32), jax.nn.softmax(logits_NE, axis=-1), jax.nn.logsumexp(logits_NE, axis=-1)


ROUTERS = {"softmax_topk": softmax_topk, "sigmoid_topk": sigmoid_topk}
