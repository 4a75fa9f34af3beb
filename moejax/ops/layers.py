"""Per-device building blocks with Hugging Face semantics: RMSNorm, RoPE, attention.

These see local blocks only (a device's heads, its sequences) and issue no collectives, except
`sharded_rmsnorm`, whose sum of squares spans a dimension split over a mesh axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def mm(eq: str, a, b):
    """einsum with float32 accumulation whatever the input dtype."""
    return jnp.einsum(eq, a, b, preferred_element_type=F32)


def once_over(axis: str | None, bias):
    """`bias` on the first device of `axis` and zero on the others: a bias added to partial sums that
    the devices of `axis` then add up counts once (None: no axis, the bias as it is)."""
    if axis is None:
        return bias
    return bias * (jax.lax.axis_index(axis) == 0).astype(bias.dtype)


def rmsnorm(x, w, eps: float):
    """Normalise in float32, cast back to the input dtype, then scale (as transformers does). A weight
    kept in float32 (a family's `Param.f32`: GPT-OSS's norms, transformers' _keep_in_fp32_modules)
    scales the float32 value before the cast, as transformers does there."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if w.dtype == F32:
        return (w * y).astype(x.dtype)
    return (w * y.astype(x.dtype)).astype(x.dtype)


def sharded_rmsnorm(x, w, eps: float, total: int, axis: str | None):
    """RMSNorm over a last dimension of `total` features split over mesh `axis` (x holds this
    device's slice, w the matching slice of the weight): the sum of squares is summed over `axis`."""
    xf = x.astype(F32)
    ss = jnp.sum(xf * xf, axis=-1, keepdims=True)
    if axis is not None:
        ss = jax.lax.psum(ss, axis)
    y = xf * jax.lax.rsqrt(ss / total + eps)
    return (w * y.astype(x.dtype)).astype(x.dtype)


def rope_frequencies(dim: int, theta: float, rope: dict):
    """Inverse frequencies [dim/2] (float32, numpy) and the factor cos and sin are multiplied by, for
    `dim` rotated dims, as transformers' modeling_rope_utils computes them: default, linear (the
    frequencies divided by `factor`) and yarn (interpolated frequencies blended into the original ones
    over a ramp between the correction dims of beta_fast and beta_slow; attention_factor from mscale)."""
    kind = rope.get("rope_type", "default")
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / pos_freqs).astype(np.float32)
    if kind == "default":
        return inv, 1.0
    factor = float(rope["factor"])
    if kind == "linear":
        return (inv / np.float32(factor)).astype(np.float32), 1.0
    orig = rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolation * (1 - extrapolation) + inv * extrapolation).astype(np.float32), float(attention_factor)


def rope_tables(pos_BT, inv_freq, attention_factor: float, dtype):
    """cos, sin [B, T, R] for integer positions (R = 2 x len(inv_freq) rotated dims), rotate-half
    layout (freqs repeated twice), both scaled by `attention_factor` (yarn's)."""
    freqs_BTk = pos_BT.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    emb_BTK = jnp.concatenate([freqs_BTk, freqs_BTk], axis=-1)
    return (jnp.cos(emb_BTK) * attention_factor).astype(dtype), (jnp.sin(emb_BTK) * attention_factor).astype(dtype)


def apply_rope(x_BTHK, cos_BTR, sin_BTR):
    """Rotate the first R dims of each head (R from the tables); the rest pass through (partial RoPE)."""
    r = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTHK[..., :r], x_BTHK[..., r:]
    half = r // 2
    rot = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos_BTR[:, :, None, :] + rot * sin_BTR[:, :, None, :]
    return out if r == x_BTHK.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


def window_mask(q_pos, k_pos, window):
    """Causal, and within `window` positions of the query where one is given: transformers' sliding
    window keeps key j for query i when i - window < j <= i (the query itself and window - 1 before)."""
    mask = k_pos <= q_pos
    return mask if window is None else mask & (k_pos > q_pos - window)


def attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=None, causal: bool = False, platform: str = "cpu", sinks_H=None,
              window=None):
    """Grouped-query attention; scores and softmax in float32, probabilities in the input dtype.
    `sinks_H` (this device's heads): a logit per head that joins the softmax's denominator and is then
    dropped (GPT-OSS). `window` (causal only; an int or a traced scalar): a sliding window.

    On GPU this is `jax.nn.dot_product_attention`: causal 16-bit attention (prefill) asks for cuDNN's
    fused kernel, which never materialises the [H, T, S] scores (jax's default is its XLA version),
    and falls back to the XLA version where cuDNN refuses the shapes at trace time. Sinks have no
    such kernel: that attention is written out, as on CPU. On CPU the same arithmetic is written
    out: jax's version asks for an F16_F16_F32 dot algorithm that XLA:CPU rejects.
    """
    b, t, h, k = q_BTHK.shape
    g, s = k_BSGK.shape[2], k_BSGK.shape[1]
    if causal and window is not None:  # a mask, not the causal kernel
        mask_BTS = jnp.broadcast_to(window_mask(jnp.arange(t)[:, None], jnp.arange(s)[None, :], window), (b, t, s))
        causal = False
    if platform == "gpu" and sinks_H is None:
        if causal and mask_BTS is None and q_BTHK.dtype in (jnp.bfloat16, jnp.float16):
            import logging

            try:
                out = jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True,
                                                   implementation="cudnn")
                key, which = "cudnn", "causal 16-bit attention runs cuDNN's fused kernel"
            except (ValueError, NotImplementedError, RuntimeError) as e:  # cuDNN missing or the shapes refused
                out, key = None, ("xla", type(e).__name__)
                which = (f"causal 16-bit attention runs XLA's version: cuDNN's fused kernel refused q "
                         f"{tuple(q_BTHK.shape)} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
            said = attention.__dict__.setdefault("said", set())  # say each outcome once per process
            if key not in said:
                said.add(key)
                logging.getLogger("moejax").warning(which)
            if out is not None:
                return out
        mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, is_causal=causal)
    if t == 1 and platform != "gpu":  # (a GPU here has sinks: the general form below)
        return _attention_one_query(q_BTHK, k_BSGK, v_BSGK, mask_BTS, sinks_H)
    q_BTGRK = q_BTHK.reshape(b, t, g, h // g, k)
    scores_BGRTS = mm("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK) * (k ** -0.5)
    if causal:
        mask_BTS = jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool)), (b, t, s))
    if mask_BTS is not None:
        scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS, -jnp.inf)
    probs_BGRTS = _softmax(scores_BGRTS, None if sinks_H is None else sinks_H.reshape(g, h // g, 1, 1))
    out_BTGRK = mm("bgrts,bsgk->btgrk", probs_BGRTS.astype(v_BSGK.dtype), v_BSGK).astype(q_BTHK.dtype)
    return out_BTGRK.reshape(b, t, h, k)


def _softmax(scores, sink=None, axis: int = -1):
    """Softmax over `axis`; with a sink (broadcastable to the scores with 1 along `axis`), its logit
    joins the denominator and its probability is dropped, as transformers' GPT-OSS eager attention
    (a query whose keys are all masked then gets zeros, not NaN)."""
    if sink is None:
        return jax.nn.softmax(scores, axis=axis)
    shape = list(scores.shape)
    shape[axis] = 1
    both = jnp.concatenate([scores, jnp.broadcast_to(sink.astype(F32), shape)], axis=axis)
    probs = jax.nn.softmax(both, axis=axis)
    return jax.lax.slice_in_dim(probs, 0, scores.shape[axis], axis=axis % scores.ndim)


def _attention_one_query(q_B1HK, k_BSGK, v_BSGK, mask_B1S, sinks_H=None):
    """Decode attention (one query per sequence) as two batched matmuls over all kv heads at once.

    Each query head's vector is placed in its own block of a [G*K, G] matrix, so the scores of all
    heads are one [S, G*K] x [G*K, G] matmul per sequence, and the values one [G, S] x [S, G*K]
    matmul whose diagonal blocks are the outputs (G times the FLOPs of the exact products, which are
    tiny, while the cache is read once by XLA:CPU's fast matmuls). The multiply-and-reduce form took
    ~0.75 ms a layer in the seed decode, the per-head einsum form ran as 128 tiny batched dots;
    this one made the seed decode step ~7% faster (A/B in one process). Probabilities are rounded
    to the cache dtype before the value matmul, as in prefill."""
    b, _, h, k = q_B1HK.shape
    _, s, g, _ = k_BSGK.shape
    r = h // g
    eye_GG = jnp.eye(g, dtype=q_B1HK.dtype)
    k_BSJ, v_BSJ = k_BSGK.reshape(b, s, g * k), v_BSGK.reshape(b, s, g * k)  # J = G*K
    q_BGRK = q_B1HK.reshape(b, g, r, k)
    outs = []
    for i in range(r):  # query heads i, r + i, ... share kv heads 0, 1, ...
        q_BGK = q_BGRK[:, :, i]
        q_BJG = (q_BGK[:, :, :, None] * eye_GG[:, None, :]).reshape(b, g * k, g)
        scores_BSG = mm("bsj,bjg->bsg", k_BSJ, q_BJG) * (k ** -0.5)
        if mask_B1S is not None:
            scores_BSG = jnp.where(mask_B1S[:, 0, :, None], scores_BSG, -jnp.inf)
        sink = None if sinks_H is None else sinks_H.reshape(g, r)[None, None, :, i]
        probs_BSG = _softmax(scores_BSG, sink, axis=1).astype(v_BSGK.dtype)
        out_BGGK = mm("bsg,bsj->bgj", probs_BSG, v_BSJ).reshape(b, g, g, k)
        outs.append(jnp.diagonal(out_BGGK, axis1=1, axis2=2).transpose(0, 2, 1))  # [B, G, K]
    return jnp.stack(outs, axis=2).reshape(b, 1, h, k).astype(q_B1HK.dtype)
