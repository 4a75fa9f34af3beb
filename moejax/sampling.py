"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), from a seed."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moejax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample(logits_BV, key, *, temperature: float, top_k: int, top_p: float):
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_B = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        cutoff_idx_B = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1) - 1
        cutoff_B = jnp.take_along_axis(sorted_BV, cutoff_idx_B[:, None], axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
