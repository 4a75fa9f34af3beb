"""Decoder layers shared by families, per device (inside the shard_map of models/transformer.py).

`attention_moe_layer`: pre-norm attention on local heads -> psum_scatter over tp (each tp rank now
owns N/tp tokens) -> residual -> the pre-norm FFN of this layer -> residual -> all_gather over tp.
Attention is multi-head latent attention (ops/mla.py) under `kv_lora_rank`, else grouped-query attention
(ops/attention.py). The FFN is the MoE over the expert axes (ops/moe), plus a shared expert on every token where the
config has one, or a dense SwiGLU on the layers listed in `dense_layers`; a slot whose stages hold
different kinds picks by stage index at run time, as does a slot whose stages hold sliding-window and
full-attention layers. What differs between the families that use it (QK-norm, biases, sinks, sliding
windows, RoPE, the router, the experts' biases and activation, shared experts, dense layers) is read
from the config, never from the family's name.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moejax.ops import quant as q8
from moejax.ops.attention import attention_block
from moejax.ops.layers import F32, rmsnorm
from moejax.ops.mla import mla_block
from moejax.ops.moe.dispatch import moe_block, zero_stats
from moejax.ops.moe.experts import swiglu

if TYPE_CHECKING:
    from moejax.models.runspec import RunSpec


def dense_ffn(h_ND, w1, w3, w2, tp_axis: str | None):
    """A SwiGLU on this device's 1/tp share of the tokens, float32 out. With its hidden dim split over
    `tp_axis` (the layout's `ffn` rule): gather the tokens over tp, run the local hidden slice,
    reduce-scatter the partial sums back."""
    if tp_axis is not None:
        h_ND = jax.lax.all_gather(h_ND, tp_axis, axis=0, tiled=True)
    y_ND = swiglu(h_ND, w1, w3, w2, F32)
    if tp_axis is not None:
        y_ND = jax.lax.psum_scatter(y_ND, tp_axis, scatter_dimension=0, tiled=True)
    return y_ND


def _moe_ffn(x_ND, valid_N, w, rs: RunSpec, tp_axis):
    y_ND, stats = moe_block(x_ND, valid_N, w, rs.moe_spec(), rs.cfg.rms_norm_eps)
    if rs.cfg.shared_expert_ffn:  # every token, beside its routed experts
        h_ND = rmsnorm(x_ND, w["moe_norm"], rs.cfg.rms_norm_eps)
        s_ND = dense_ffn(h_ND, w["shared_w1"], w["shared_w3"], w["shared_w2"], tp_axis)
        if rs.cfg.shared_expert_gate:
            gate_N1 = q8.matmul("nd,do->no", h_ND, w["shared_gate"])
            s_ND = jax.nn.sigmoid(gate_N1.astype(h_ND.dtype)).astype(F32) * s_ND.astype(h_ND.dtype)
        y_ND = y_ND + s_ND
    return y_ND, stats


def _dense_layer_ffn(x_ND, valid_N, w, rs: RunSpec, tp_axis):
    h_ND = rmsnorm(x_ND, w["moe_norm"], rs.cfg.rms_norm_eps)
    return dense_ffn(h_ND, w["dense_w1"], w["dense_w3"], w["dense_w2"], tp_axis), zero_stats(rs.cfg.num_experts)


def slot_window(rs: RunSpec, slot: int):
    """The sliding window of local layer `slot` (`ModelConfig.layer_window`): None where every stage's
    layer there attends fully, an int where they agree, else each stage's (full: past any position),
    picked by stage index at run time."""
    lp = rs.cfg.num_layers // rs.shape.pp
    windows = [rs.cfg.layer_window(s * lp + slot) for s in range(rs.shape.pp)]
    if len(set(windows)) == 1:
        return windows[0]
    return jnp.asarray([2**30 if w is None else w for w in windows], jnp.int32)[jax.lax.axis_index("pp")]


def attention_moe_layer(x_BTD, valid_BT, w, side, mode: str, kv, row0, rs: RunSpec, slot: int = 0):
    """One decoder layer on one device (local layer `slot` of its stage). x_BTD is identical on the tp
    ranks before and after."""
    b, t, d = x_BTD.shape
    tp = rs.shape.tp
    tp_axis = "tp" if tp > 1 else None
    ffn_axis = tp_axis if rs.layout.mesh_axes("ffn") else None  # a dense FFN's hidden dim over tp
    attention = functools.partial(mla_block, absorb=rs.mla_absorb) if rs.cfg.latent_attention else attention_block
    attend = functools.partial(attention, x_BTD, w, side, mode, kv, row0, rs.cfg, rs.platform, tp_axis,
                               window=slot_window(rs, slot))
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
    moe_here = [i >= 0 for i in rs.cfg.slot_rows("moe", rs.shape.pp)[slot]]  # per stage
    ffn = [functools.partial(f, x_ND, valid_N, w, rs, ffn_axis) for f in (_dense_layer_ffn, _moe_ffn)]
    if all(moe_here):
        y_ND, stats = ffn[1]()
    elif not any(moe_here):
        y_ND, stats = ffn[0]()
    else:  # this slot holds a MoE layer on some stages and a dense one on others
        which = jnp.asarray(moe_here, jnp.int32)[jax.lax.axis_index("pp")]
        y_ND, stats = jax.lax.switch(which, ffn)
    x_ND = x_ND + y_ND.astype(x_ND.dtype)
    if tp > 1:
        x_ND = jax.lax.all_gather(x_ND, "tp", axis=0, tiled=True)
    return x_ND[:n].reshape(b, t, d), kv, stats
