"""One expert's FFN on a block of rows, per device: down(act(gate(x), up(x))), float32 accumulation.

The activation is SwiGLU, silu(g) * u, or where a config says so (`swiglu_alpha`, `swiglu_limit`,
`swiglu_up_offset`: GPT-OSS) its clamped form: g <= limit, -limit <= u <= limit, then
g * sigmoid(alpha g) * (u + offset). Under `expert_bias` the gate, up and down projections add
biases (b1, b3 [F], b2 [D]); the caller gives b2 to one device of an F-split expert only, since the
devices' outputs are partial sums. The kernels in dispatch.py and ragged.py call these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.ops import quant as q8
from moejax.ops.layers import once_over


@dataclasses.dataclass(frozen=True)
class Act:
    """The experts' activation (ModelConfig's swiglu_* fields)."""

    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0


def glu(g, u, act: Act = Act()):
    """silu(g) * u, or the clamped and offset form of `act` (in the dtype of g and u)."""
    if act == Act():
        return jax.nn.silu(g) * u
    if act.limit is not None:
        g = jnp.minimum(g, act.limit)
        u = jnp.clip(u, -act.limit, act.limit)
    return (u + act.up_offset) * (g * jax.nn.sigmoid(act.alpha * g))


def swiglu(x_RD, w1_DF, w3_DF, w2_FD, out_dtype, act: Act = Act(), b=None):
    """One expert on a block of rows; b: (b1_F, b3_F, b2_D) or None."""
    cdt = x_RD.dtype
    g_RF = q8.matmul("rd,df->rf", x_RD, w1_DF)
    u_RF = q8.matmul("rd,df->rf", x_RD, w3_DF)
    if b is not None:
        g_RF, u_RF = g_RF + b[0], u_RF + b[1]
    y_RD = q8.matmul("rf,fd->rd", glu(g_RF.astype(cdt), u_RF.astype(cdt), act), w2_FD)
    return (y_RD if b is None else y_RD + b[2]).astype(out_dtype)


def swiglu_batched(x_LRD, w1_LDF, w3_LDF, w2_LFD, out_dtype, act: Act = Act(), b=None):
    """`swiglu` for all local experts at once: one batched matmul per expert matrix; b: (b1_LF, b3_LF,
    b2_LD) or None."""
    cdt = x_LRD.dtype
    g_LRF = q8.matmul("lrd,ldf->lrf", x_LRD, w1_LDF)
    u_LRF = q8.matmul("lrd,ldf->lrf", x_LRD, w3_LDF)
    if b is not None:
        g_LRF, u_LRF = g_LRF + b[0][:, None], u_LRF + b[1][:, None]
    y_LRD = q8.matmul("lrf,lfd->lrd", glu(g_LRF.astype(cdt), u_LRF.astype(cdt), act), w2_LFD)
    return (y_LRD if b is None else y_LRD + b[2][:, None]).astype(out_dtype)


def expert_biases(w, expert_bias: bool, ffn_axis: str | None, j: int | None = None):
    """(b1, b3, b2) of the local experts (stacked [E_loc, ...], or local expert j's), b2 zero on all but
    the first device of `ffn_axis`; None without `expert_bias`."""
    if not expert_bias:
        return None
    b1, b3, b2 = (w[n] if j is None else w[n][j] for n in ("b1", "b3", "b2"))
    return b1, b3, once_over(ffn_axis, b2)  # the F-split devices' outputs are summed: the down bias once
