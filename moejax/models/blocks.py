"""Decoder layers shared by families, per device (inside the shard_map of models/transformer.py).

`attention_moe_layer`: pre-norm attention on local heads -> psum_scatter over tp (each tp rank now
owns N/tp tokens) -> residual -> pre-norm MoE over the expert axes (ops/moe) -> residual ->
all_gather over tp. What differs between the families that use it (QK-norm, the router's top-k
renormalisation, head_dim) is read from the config, never from the family's name.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moejax.ops.attention import attention_block
from moejax.ops.layers import F32
from moejax.ops.moe.dispatch import moe_block

if TYPE_CHECKING:
    from moejax.models.runspec import RunSpec


def attention_moe_layer(x_BTD, valid_BT, w, side, mode: str, kv, row0, rs: RunSpec):
    """One decoder layer on one device. x_BTD is identical on the tp ranks before and after."""
    b, t, d = x_BTD.shape
    tp = rs.shape.tp
    attend = functools.partial(attention_block, x_BTD, w, side, mode, kv, row0, rs.cfg, rs.platform,
                               "tp" if tp > 1 else None)
    # On CPU a device whose rows are all padding skips its attention (4x2x4x4, 8 prompts on 16 batch
    # shards: prefill 2926 -> 2709 ms, decode step 721 -> 524 ms); on GPU a conditional costs a
    # device-to-host sync, and batches fill their shards there. A norm over the whole projection
    # sums over tp inside the attention, so every device runs it.
    if rs.platform == "cpu" and rs.cfg.qk_norm != "proj":
        o_BTD, kv = jax.lax.cond(jnp.any(valid_BT), attend, lambda: (jnp.zeros((b, t, d), F32), kv))
    else:
        o_BTD, kv = attend()
    n = b * t
    n_pad = -(-n // tp) * tp
    x_ND = jnp.pad(x_BTD.reshape(n, d), ((0, n_pad - n), (0, 0)))
    valid_N = jnp.pad(valid_BT.reshape(n), (0, n_pad - n))
    o_ND = jnp.pad(o_BTD.reshape(n, d), ((0, n_pad - n), (0, 0)))
    if tp > 1:  # each tp rank takes a distinct 1/tp share of the tokens, fully summed
        o_ND = jax.lax.psum_scatter(o_ND, "tp", scatter_dimension=0, tiled=True)
        share = n_pad // tp
        start = jax.lax.axis_index("tp") * share
        x_ND = jax.lax.dynamic_slice_in_dim(x_ND, start, share)
        valid_N = jax.lax.dynamic_slice_in_dim(valid_N, start, share)
    x_ND = x_ND + o_ND.astype(x_ND.dtype)
    y_ND, stats = moe_block(x_ND, valid_N, w, rs.moe_spec(), rs.cfg.rms_norm_eps)
    x_ND = x_ND + y_ND.astype(x_ND.dtype)
    if tp > 1:
        x_ND = jax.lax.all_gather(x_ND, "tp", axis=0, tiled=True)
    return x_ND[:n].reshape(b, t, d), kv, stats
