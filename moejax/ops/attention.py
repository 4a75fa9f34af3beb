"""Attention with a KV cache, per device: the pre-norm projection, RoPE, the cache write and read of
each serving mode, and the output projection's partial sums (the caller reduces them over tp).
No family: the projections are named wq, wk, wv, wo in the layer's weights. No collectives but one:
a norm over the whole q/k projection (`qk_norm: proj`) sums its squares over the head axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config.model import ModelConfig
from moejax.ops import layers
from moejax.ops import quant as q8


def cache_dtype(dtype):
    """The KV cache holds 16-bit floats as their uint16 bit patterns: XLA:CPU scatters bfloat16 by
    converting the whole cache to float32 and back (5x slower, 2x the cache in temporaries), and a
    bitcast to uint16 around the scatter became two copies of the cache."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def bits(x, dtype):
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def attention_block(x_BTD, w, side, mode: str, kv, row0, cfg: ModelConfig, platform: str,
                    head_axis: str | None = None):
    """Pre-norm attention on this device's heads with its KV cache (w: attn_norm, wq, wk, wv, wo; bq,
    bk, bv under `cfg.attention_bias`; q_norm, k_norm under `cfg.qk_norm`; partial and scaled RoPE from
    `cfg.rotary_dim` and `cfg.rope`;
    `mode` as models/transformer.py `build`; `head_axis`: the mesh axis the heads are split over, for
    `qk_norm: proj`, whose mean of squares spans every head). Returns the partial (over tp) output
    [B, T, D] f32 and kv."""
    cdt = x_BTD.dtype
    h_BTD = layers.rmsnorm(x_BTD, w["attn_norm"], cfg.rms_norm_eps)
    b, t, d = x_BTD.shape
    heads = lambda w_: q8.reshape(w_, (d,), (-1,))  # 2-D dots: XLA:CPU runs [.., H, K] contractions 2-3x slower
    q_BTJ, k_BTJ, v_BTJ = (q8.matmul("btd,dj->btj", h_BTD, heads(w[n])) for n in ("wq", "wk", "wv"))
    if cfg.attention_bias:  # this device's heads' slices of the q, k, v biases
        q_BTJ, k_BTJ, v_BTJ = (a + w[n].reshape(-1) for a, n in ((q_BTJ, "bq"), (k_BTJ, "bk"), (v_BTJ, "bv")))
    q_BTJ, k_BTJ, v_BTJ = (a.astype(cdt) for a in (q_BTJ, k_BTJ, v_BTJ))
    if cfg.qk_norm == "proj":  # over the whole projection: this device's heads are a slice of it
        q_BTJ = layers.sharded_rmsnorm(q_BTJ, w["q_norm"], cfg.rms_norm_eps, cfg.num_heads * cfg.head_dim, head_axis)
        k_BTJ = layers.sharded_rmsnorm(k_BTJ, w["k_norm"], cfg.rms_norm_eps, cfg.num_kv_heads * cfg.head_dim,
                                       head_axis)
    if cfg.clip_qkv is not None:
        q_BTJ, k_BTJ, v_BTJ = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q_BTJ, k_BTJ, v_BTJ))
    q_BTHK, k_BTGK, v_BTGK = (a.reshape(b, t, -1, cfg.head_dim) for a in (q_BTJ, k_BTJ, v_BTJ))
    if cfg.qk_norm == "head":  # each head's q and k RMS-normalised over its K dims, before RoPE
        q_BTHK = layers.rmsnorm(q_BTHK, w["q_norm"], cfg.rms_norm_eps)
        k_BTGK = layers.rmsnorm(k_BTGK, w["k_norm"], cfg.rms_norm_eps)
    inv_freq, factor = layers.rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope)
    cos, sin = layers.rope_tables(side["pos"], inv_freq, factor, cdt)
    q_BTHK, k_BTGK = layers.apply_rope(q_BTHK, cos, sin), layers.apply_rope(k_BTGK, cos, sin)
    if mode == "decode":
        mb = x_BTD.shape[0]
        pos_B = side["pos"][:, 0]
        rows_B = jnp.where(side["valid"][:, 0], row0 + jnp.arange(mb), kv[0].shape[0])
        kv = tuple(c.at[rows_B, pos_B].set(bits(n[:, 0], c.dtype), mode="drop")
                   for c, n in zip(kv, (k_BTGK, v_BTGK)))
        k_BSGK, v_BSGK = (bits(jax.lax.dynamic_slice_in_dim(c, row0, mb, axis=0), cdt) for c in kv)
        mask_BTS = (jnp.arange(k_BSGK.shape[1])[None, :] <= pos_B[:, None])[:, None, :]
        out_BTHK = layers.attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=mask_BTS, platform=platform)
    elif mode == "extend":  # rows of the cache named per sequence; T new tokens at positions pos_BT
        rows_B, pos_BT = side["row"], side["pos"]
        write_BT = jnp.where(side["valid"], rows_B[:, None], kv[0].shape[0])  # padding: dropped
        kv = tuple(c.at[write_BT, pos_BT].set(bits(n, c.dtype), mode="drop") for c, n in zip(kv, (k_BTGK, v_BTGK)))
        k_BSGK, v_BSGK = (bits(c[rows_B], cdt) for c in kv)
        mask_BTS = jnp.arange(k_BSGK.shape[1])[None, None, :] <= pos_BT[:, :, None]
        out_BTHK = layers.attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=mask_BTS, platform=platform)
    else:
        out_BTHK = layers.attention(q_BTHK, k_BTGK, v_BTGK, causal=True, platform=platform)
        if mode == "prefill":
            kv = tuple(jax.lax.dynamic_update_slice(c, bits(n, c.dtype), (row0, 0, 0, 0))
                       for c, n in zip(kv, (k_BTGK, v_BTGK)))
    return q8.matmul("btj,jd->btd", out_BTHK.reshape(b, t, -1), q8.reshape(w["wo"], (-1,), (d,))), kv
