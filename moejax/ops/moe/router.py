"""Routers: how each token picks its experts and with what weights. A family names its router."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops.layers import F32, mm

I32 = jnp.int32


def softmax_topk(h_ND, router_DE, top_k: int):
    """Router logits in the model dtype, softmax in float32, top-k (Mixtral). Returns the
    probabilities, the chosen experts and each token's logsumexp of the logits (the z-loss's)."""
    logits_NE = mm("nd,de->ne", h_ND, router_DE).astype(h_ND.dtype).astype(F32)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, experts_NK = jax.lax.top_k(probs_NE, top_k)
    return probs_NE, experts_NK.astype(I32), jax.nn.logsumexp(logits_NE, axis=-1)


ROUTERS = {"softmax_topk": softmax_topk}
